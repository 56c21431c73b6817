//! What the `Observed` wrapper (which `keel::connect` puts around every backend) costs per
//! operation on the fastest backend, where it shows most: the memory-only engine through the
//! contract, one caller, `get` (hit), `incr` and one GCRA `rate_limit` step, each
//!
//! - `bare`: the backend itself,
//! - `observed`: wrapped, no `metrics` recorder and no `tracing` subscriber (the default),
//! - `observed+prometheus`: wrapped, with metrics-exporter-prometheus's recorder installed
//!   (what a service exporting `/metrics` runs; no subscriber).
//!
//! `cargo bench --bench observe [-- --quick] [-- FILTER]`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use keel_primitives::backend::{RateAlgorithm, RateMode, RateRule};
use keel_primitives::{Backend, Embedded, Observed};
use metrics_exporter_prometheus::PrometheusBuilder;

/// Keys loaded for the `get` hits.
const KEYS: u64 = 10_000;
const VALUE_BYTES: usize = 100;
const TTL: Duration = Duration::from_secs(3600);

fn key(i: u64) -> Vec<u8> {
    format!("key:{i:012}").into_bytes()
}

/// Times `iters` runs of `op` inside one `block_on`, with the Prometheus recorder installed
/// for the thread when `recorder` is given.
fn timed<F, Fut>(
    runtime: &tokio::runtime::Runtime,
    recorder: Option<&metrics_exporter_prometheus::PrometheusRecorder>,
    iters: u64,
    mut op: F,
) -> Duration
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut run = || {
        runtime.block_on(async {
            let started = Instant::now();
            for i in 0..iters {
                op(i).await;
            }
            started.elapsed()
        })
    };
    match recorder {
        Some(r) => metrics::with_local_recorder(r, run),
        None => run(),
    }
}

fn wrapper_cost(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let engine = Arc::new(Embedded::memory());
    let value = vec![b'v'; VALUE_BYTES];
    runtime.block_on(async {
        for i in 0..KEYS {
            engine.set(&key(i), &value, None).await.expect("loading");
        }
    });
    let keys: Arc<Vec<Vec<u8>>> = Arc::new((0..KEYS).map(key).collect());
    let recorder = PrometheusBuilder::new().build_recorder();
    let bare: Arc<dyn Backend> = engine.clone();
    let observed: Arc<dyn Backend> = Arc::new(Observed::new(engine.clone() as Arc<dyn Backend>));
    let variants: [(&str, &Arc<dyn Backend>, Option<&_>); 3] = [
        ("bare", &bare, None),
        ("observed", &observed, None),
        ("observed+prometheus", &observed, Some(&recorder)),
    ];

    let mut group = c.benchmark_group("get_hit");
    for (name, backend, rec) in variants {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                timed(&runtime, rec, iters, |i| {
                    let backend = Arc::clone(backend);
                    let keys = Arc::clone(&keys);
                    async move {
                        let k = &keys[(i.wrapping_mul(7919) % KEYS) as usize];
                        black_box(backend.get(k).await.expect("get"));
                    }
                })
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("incr");
    for (name, backend, rec) in variants {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                timed(&runtime, rec, iters, |i| {
                    let backend = Arc::clone(backend);
                    async move {
                        let k = format!("counter:{}", i % 1_000);
                        black_box(
                            backend
                                .incr(k.as_bytes(), 1, Some(TTL))
                                .await
                                .expect("incr"),
                        );
                    }
                })
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("rate_limit");
    for (name, backend, rec) in variants {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                timed(&runtime, rec, iters, |i| {
                    let backend = Arc::clone(backend);
                    async move {
                        let k = format!("rl:{}", i % 1_000);
                        let rule = RateRule {
                            key: k.as_bytes(),
                            algorithm: RateAlgorithm::Gcra,
                            limit: 1_000_000,
                            period_ms: 1_000,
                            burst: 1_000_000,
                            cost: 1,
                        };
                        black_box(
                            backend
                                .rate_limit(&[rule], RateMode::Consume, None)
                                .await
                                .expect("rate_limit"),
                        );
                    }
                })
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = wrapper_cost
}
criterion_main!(benches);
