//! The command line: `--help`'s text, the options and their parsing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub const USAGE: &str = "\
usage: loadgen --addr 127.0.0.1:PORT --proto http|kvd [options]
  --open-rate N        new connections per second, one request each (500; 0: none)
  --open-workers N     threads running the open-loop schedule (32)
  --closed N           keep-alive clients (8)
  --warmup SECS        load before the first swap, not reported (2)
  --swaps N            swaps to perform (0)
  --interval MS        from one swap's start to the next's (150)
  --min-gap MS         at least this long from one swap's end to the next's start (30)
  --swap-cmd CMD       run by `sh -c`; returns when the swap is complete
  --pre-swap-cmd CMD   run by `sh -c` before each swap, outside its window (a copy of a binary)
  --swap-timeout SECS  a swap command still running then is killed, and failed (60)
  --max-failures N     stop swapping after N failed swaps in a row (3)
  --duration SECS      with no swaps: how long to measure after the warmup (5)
  --cooldown SECS      load after the last swap (1)
  --max-secs SECS      no swap starts later than this after the start (3600)
  --answer-timeout S   a request unanswered this long after its start fails (5)
  --connect-timeout S  a connect taking this long fails (2)
  --kvd-ops setget|ping  kvd requests (setget)
  --keys N             kvd key space (1000)
  --label NAME         the target's name in the report (target)
  --json FILE          also write the results as one JSON object
  --wait-ready SECS    first wait (bounded) until the target accepts a connection (0: no)
  --dump FILE          every request and swap window, one a line (times in ms since the start)
loadgen --print-free-port   prints a free 127.0.0.1 port below the ephemeral range";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http,
    Kvd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvdOps {
    SetGet,
    Ping,
}

#[derive(Debug)]
pub struct Opts {
    pub addr: SocketAddr,
    pub proto: Proto,
    pub open_rate: u32,
    pub open_workers: usize,
    pub closed: usize,
    pub warmup: Duration,
    pub swaps: usize,
    pub interval: Duration,
    pub min_gap: Duration,
    pub swap_cmd: Option<String>,
    pub pre_swap_cmd: Option<String>,
    pub swap_timeout: Duration,
    pub max_failures: usize,
    pub duration: Duration,
    pub cooldown: Duration,
    pub max_secs: Duration,
    pub answer_timeout: Duration,
    pub connect_timeout: Duration,
    pub kvd_ops: KvdOps,
    pub keys: u32,
    pub label: String,
    pub json: Option<PathBuf>,
    pub wait_ready: Duration,
    pub dump: Option<PathBuf>,
}

pub fn secs(v: &str) -> Result<Duration, String> {
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{v:?} is not a number of seconds"))
}

pub fn millis(v: &str) -> Result<Duration, String> {
    secs(v).map(|d| d / 1000)
}

pub fn num<T: std::str::FromStr>(v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("{v:?} is not a number"))
}

pub fn parse_args(argv: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        proto: Proto::Http,
        open_rate: 500,
        open_workers: 32,
        closed: 8,
        warmup: Duration::from_secs(2),
        swaps: 0,
        interval: Duration::from_millis(150),
        min_gap: Duration::from_millis(30),
        swap_cmd: None,
        pre_swap_cmd: None,
        swap_timeout: Duration::from_secs(60),
        max_failures: 3,
        duration: Duration::from_secs(5),
        cooldown: Duration::from_secs(1),
        max_secs: Duration::from_secs(3600),
        answer_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        kvd_ops: KvdOps::SetGet,
        keys: 1000,
        label: "target".into(),
        json: None,
        wait_ready: Duration::ZERO,
        dump: None,
    };
    let (mut addr, mut proto) = (None, None);
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        if a == "-h" || a == "--help" {
            return Err(String::new());
        }
        let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--addr" => addr = Some(num::<SocketAddr>(v)?),
            "--proto" => {
                proto = Some(match v.as_str() {
                    "http" => Proto::Http,
                    "kvd" => Proto::Kvd,
                    _ => return Err(format!("--proto {v:?}: http or kvd")),
                })
            }
            "--open-rate" => o.open_rate = num(v)?,
            "--open-workers" => o.open_workers = num::<usize>(v)?.max(1),
            "--closed" => o.closed = num(v)?,
            "--warmup" => o.warmup = secs(v)?,
            "--swaps" => o.swaps = num(v)?,
            "--interval" => o.interval = millis(v)?,
            "--min-gap" => o.min_gap = millis(v)?,
            "--swap-cmd" => o.swap_cmd = Some(v.clone()),
            "--pre-swap-cmd" => o.pre_swap_cmd = Some(v.clone()),
            "--swap-timeout" => o.swap_timeout = secs(v)?,
            "--max-failures" => o.max_failures = num::<usize>(v)?.max(1),
            "--duration" => o.duration = secs(v)?,
            "--cooldown" => o.cooldown = secs(v)?,
            "--max-secs" => o.max_secs = secs(v)?,
            "--answer-timeout" => o.answer_timeout = secs(v)?,
            "--connect-timeout" => o.connect_timeout = secs(v)?,
            "--kvd-ops" => {
                o.kvd_ops = match v.as_str() {
                    "setget" => KvdOps::SetGet,
                    "ping" => KvdOps::Ping,
                    _ => return Err(format!("--kvd-ops {v:?}: setget or ping")),
                }
            }
            "--keys" => o.keys = num::<u32>(v)?.max(1),
            "--label" => o.label = v.clone(),
            "--json" => o.json = Some(PathBuf::from(v)),
            "--wait-ready" => o.wait_ready = secs(v)?,
            "--dump" => o.dump = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown option {a}")),
        }
    }
    o.addr = addr.ok_or("--addr is required")?;
    o.proto = proto.ok_or("--proto is required")?;
    // The machine's rule: load goes to this machine only.
    if !o.addr.ip().is_loopback() {
        return Err(format!(
            "--addr {}: only loopback addresses are allowed",
            o.addr
        ));
    }
    if o.swaps > 0 && o.swap_cmd.is_none() {
        return Err("--swaps needs --swap-cmd".into());
    }
    if o.open_rate == 0 && o.closed == 0 {
        return Err("no clients: --open-rate and --closed are both 0".into());
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets() {
        let args = |a: &str| -> Vec<String> {
            ["--proto", "http", "--addr", a]
                .iter()
                .map(|s| s.to_string())
                .collect()
        };
        assert!(parse_args(&args("127.0.0.1:80")).is_ok());
        assert!(parse_args(&args("127.1.2.3:80")).is_ok());
        assert!(parse_args(&args("[::1]:80")).is_ok());
        assert!(parse_args(&args("10.0.0.1:80")).is_err());
        assert!(parse_args(&args("192.168.1.1:80")).is_err());
    }
}
