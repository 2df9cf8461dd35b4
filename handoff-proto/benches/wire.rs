//! Frame encoding and decoding (`handoff_proto::wire`), for the smallest frame and the
//! largest ones:
//!
//! - `heartbeat`: `Message::Heartbeat`, 7 bytes on the wire;
//! - `listeners/1`: a `Listeners` batch of one;
//! - `listeners/253`: a full batch, the largest `Listeners` frame (`MAX_FDS_PER_MESSAGE`);
//! - `listeners/1000`: 1,000 listeners as the supervisor sends them, four frames
//!   (253 + 253 + 253 + 241); no single message carries more than 253.
//!
//! `encode/*` encodes the frame(s) into a fresh buffer. `decode_whole/*` pushes all the bytes
//! into one negotiated `Decoder` and takes every message out; `decode_chunked/*` pushes them in
//! 4-byte pieces (less than the 6-byte header, so even a heartbeat arrives split) and takes
//! messages out after every push, as a driver reading a slow socket does. The decoder lives
//! across iterations, like a connection's, so its buffer is reused.
//!
//! `wire_burst/heartbeats/{1000,10000}` decodes many small frames that arrive in one read
//! (7 KiB and 68 KiB; the std driver reads up to 4 MiB before it hands bytes over). Each
//! decoded frame is drained from the front of the decoder's buffer, which moves the rest of
//! the buffer, so the time per frame grows with the burst: the two sizes show by how much.
//!
//! Run: `cargo bench -p handoff-proto --bench wire`.

// `criterion_group!` defines a public function without documentation.
#![allow(missing_docs)]

mod support;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use handoff_proto::wire::{encode, Decoder, Message, SUPPORTED_VERSIONS};
use handoff_proto::MAX_FDS_PER_MESSAGE;

/// The negotiated version every frame carries.
const V: u16 = 1;

/// Bytes per push in `decode_chunked`.
const CHUNK: usize = 4;

/// The benchmarked cases: a name and the messages of one case.
fn cases() -> Vec<(&'static str, Vec<Message>)> {
    let batches = |n| {
        support::listeners(n)
            .chunks(MAX_FDS_PER_MESSAGE)
            .map(|batch| Message::Listeners {
                batch: batch.to_vec(),
            })
            .collect::<Vec<_>>()
    };
    vec![
        ("heartbeat", vec![Message::Heartbeat]),
        ("listeners/1", batches(1)),
        ("listeners/253", batches(253)),
        ("listeners/1000", batches(1000)),
    ]
}

fn encode_all(msgs: &[Message]) -> Vec<Vec<u8>> {
    msgs.iter()
        .map(|m| encode(V, m).expect("the benchmark's messages encode"))
        .collect()
}

fn decoder() -> Decoder {
    let mut d = Decoder::new(SUPPORTED_VERSIONS);
    d.set_negotiated(V);
    d
}

/// Every message in `bytes`, pushed `chunk` bytes at a time.
fn decode(d: &mut Decoder, bytes: &[u8], chunk: usize) -> usize {
    let mut n = 0;
    for piece in bytes.chunks(chunk) {
        d.push(piece);
        while let Some(m) = d.next_message().expect("the benchmark's frames decode") {
            black_box(m);
            n += 1;
        }
    }
    n
}

fn wire(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    for (name, msgs) in cases() {
        let frames = encode_all(&msgs);
        let bytes = frames.concat();
        // Outside the measurement: the bytes decode back to the same messages, both ways.
        let mut d = decoder();
        d.push(&bytes);
        let mut back = Vec::new();
        while let Some(m) = d.next_message().unwrap() {
            back.push(m);
        }
        assert_eq!(back, msgs);
        assert_eq!(decode(&mut decoder(), &bytes, CHUNK), msgs.len());
        println!(
            "wire/{name}: {} frame(s), {} bytes on the wire",
            frames.len(),
            bytes.len()
        );

        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_with_input(BenchmarkId::new("encode", name), &msgs, |b, msgs| {
            b.iter(|| {
                for m in msgs {
                    black_box(encode(V, black_box(m)).expect("encodes"));
                }
            })
        });
        let mut d = decoder();
        g.bench_with_input(
            BenchmarkId::new("decode_whole", name),
            &bytes,
            |b, bytes| {
                b.iter(|| {
                    let n = decode(&mut d, black_box(bytes), bytes.len());
                    debug_assert_eq!(n, msgs.len());
                })
            },
        );
        assert_eq!(d.buffered(), 0);
        let mut d = decoder();
        g.bench_with_input(
            BenchmarkId::new("decode_chunked", name),
            &bytes,
            |b, bytes| {
                b.iter(|| {
                    let n = decode(&mut d, black_box(bytes), CHUNK);
                    debug_assert_eq!(n, msgs.len());
                })
            },
        );
        assert_eq!(d.buffered(), 0);
    }
    g.finish();
}

fn wire_burst(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire_burst");
    // The larger burst takes milliseconds: 10 samples keep it within the time budget.
    g.sample_size(10);
    let frame = encode(V, &Message::Heartbeat).expect("encodes");
    for n in [1000, 10_000] {
        let bytes = frame.repeat(n);
        assert_eq!(decode(&mut decoder(), &bytes, bytes.len()), n);
        g.throughput(Throughput::Elements(n as u64));
        let mut d = decoder();
        g.bench_with_input(BenchmarkId::new("heartbeats", n), &bytes, |b, bytes| {
            b.iter(|| {
                let got = decode(&mut d, black_box(bytes), bytes.len());
                debug_assert_eq!(got, n);
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = support::criterion();
    targets = wire, wire_burst
}
criterion_main!(benches);
