//! What a spawned process is given to run: the [`Command`] (binary, arguments, environment,
//! stdio) and the environment it inherits ([`InheritEnv`], [`DAEMON_ENV`](super::DAEMON_ENV)).

use super::*;

/// Which of this process's environment variables a child inherits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InheritEnv {
    /// All of them, as with `std::process::Command` (the default of [`Command::new`]: a
    /// program starting a supervisor, say).
    #[default]
    All,
    /// Only those named by [`DAEMON_ENV`]; what else the child needs is set in
    /// [`Command::env`]. What a supervisor gives the daemons it starts
    /// ([`SpawnSpec`](crate::spec::SpawnSpec)).
    Daemon,
}

/// What to run: a binary, its arguments and environment, and what to do with stdio.
///
/// The child's environment: this process's variables as [`inherit_env`](Self::inherit_env)
/// selects them, with [`env`](Self::env) applied on top, in order (a later entry for the same
/// name wins). The spawn functions then set or remove the variables they manage (`HANDOFF_*`,
/// `LISTEN_*`), which override anything in `env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The program. A bare name (no `/`) is searched in `PATH`: the `PATH` of
    /// [`env`](Self::env) if it sets one, else this process's. It is the child's `argv[0]`
    /// as given.
    pub binary: PathBuf,
    /// The arguments, after `argv[0]`.
    pub args: Vec<OsString>,
    /// Environment variables set for the child, applied in order over the inherited
    /// environment.
    pub env: Vec<(OsString, OsString)>,
    /// Which of this process's variables the child inherits ([`InheritEnv::All`] from
    /// [`Command::new`]).
    pub inherit_env: InheritEnv,
    /// `true`: the child inherits this process's stdin, stdout and stderr. `false`: all three
    /// are `/dev/null` (a daemon that logs elsewhere, or a test).
    pub inherit_stdio: bool,
}

impl Command {
    /// Run `binary` with no arguments, no extra environment, this process's whole environment
    /// and its stdio.
    pub fn new(binary: impl Into<PathBuf>) -> Command {
        Command {
            binary: binary.into(),
            args: Vec::new(),
            env: Vec::new(),
            inherit_env: InheritEnv::All,
            inherit_stdio: true,
        }
    }

    /// Append an argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Command {
        self.args.push(arg.into());
        self
    }

    /// Append arguments.
    pub fn args<I, S>(mut self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Set an environment variable for the child (appended to [`env`](Self::env)).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Command {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Set [`inherit_env`](Self::inherit_env).
    pub fn inherit_env(mut self, inherit: InheritEnv) -> Command {
        self.inherit_env = inherit;
        self
    }

    /// Set [`inherit_stdio`](Self::inherit_stdio).
    pub fn inherit_stdio(mut self, inherit: bool) -> Command {
        self.inherit_stdio = inherit;
        self
    }

    /// A `std` command that never runs its own program: the `pre_exec` hook given to it execs
    /// the checked binary. It has this command's stdio and an empty environment of its own.
    pub(super) fn std_command(&self) -> std::process::Command {
        let mut c = std::process::Command::new(&self.binary);
        c.env_clear();
        if !self.inherit_stdio {
            c.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        }
        c
    }

    /// The last value [`env`](Self::env) gives `key`, else this process's.
    pub(super) fn child_var(&self, key: &str) -> Option<OsString> {
        match self.env.iter().rev().find(|(k, _)| k == key) {
            Some((_, v)) => Some(v.clone()),
            None => std::env::var_os(key),
        }
    }

    /// The child's environment: the inherited variables, then [`env`](Self::env), then
    /// `remove` removed and `set` set.
    pub(super) fn child_env(
        &self,
        remove: &[&str],
        set: &[(&str, &str)],
    ) -> BTreeMap<OsString, OsString> {
        let mut env: BTreeMap<OsString, OsString> = std::env::vars_os()
            .filter(|(k, _)| match self.inherit_env {
                InheritEnv::All => true,
                InheritEnv::Daemon => is_daemon_var(k),
            })
            .collect();
        for (k, v) in &self.env {
            env.insert(k.clone(), v.clone());
        }
        for k in remove {
            env.remove(OsStr::new(k));
        }
        for (k, v) in set {
            env.insert((*k).into(), (*v).into());
        }
        env
    }
}

/// Whether [`DAEMON_ENV`] names the variable `name`.
fn is_daemon_var(name: &OsStr) -> bool {
    let name = name.as_bytes();
    DAEMON_ENV.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix.as_bytes()),
        None => name == p.as_bytes(),
    })
}
