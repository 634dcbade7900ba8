//! Hot kernels of the CPU backend at RWKV-6 0.2B shapes (C = 768, F = 2688, V = 65536, H = 12
//! heads of 64): bf16/int8 GEMV (decode, batch 1), GEMM at batch 16 (batched decode) and 256 rows
//! (prefill chunk), the f32 reference product, and one WKV step.
//!
//! `cargo bench -p rwkv-benches` (add `-- bf16` to filter). Throughput is reported in bytes of
//! weights streamed for GEMV and in elements = multiply-adds for GEMM.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rwkv_cpu::ops::gemm::{matmul, Isa, PackedMatrix};
use rwkv_cpu::ops::matmul::{matmul as matmul_f32, Matrix};
use rwkv_cpu::ops::pool::Pool;
use rwkv_cpu::ops::wkv::{wkv6_sequence, WkvInputs};

fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|x| (x.to_bits() >> 16) as u16).collect()
}

/// (name, outputs, inputs) of the 0.2B projections.
const SHAPES: [(&str, usize, usize); 4] = [
    ("att_768x768", 768, 768),
    ("ffn_key_2688x768", 2688, 768),
    ("ffn_value_768x2688", 768, 2688),
    ("head_65536x768", 65536, 768),
];

fn gemv(c: &mut Criterion) {
    let pool = Pool::new(0);
    let isa = Isa::detect();
    let mut g = c.benchmark_group("gemv_batch1");
    g.sample_size(20);
    for (name, n, k) in SHAPES {
        let w = values(n * k, 1);
        let x = values(k, 2);
        let mut out = vec![0.0; n];
        let bf = PackedMatrix::bf16(n, k, &bf16_bits(&w));
        g.throughput(Throughput::Bytes((n * k * 2) as u64));
        g.bench_function(BenchmarkId::new("bf16", name), |b| {
            b.iter(|| matmul(&pool, isa, black_box(&x), 1, &bf, &mut out))
        });
        let q = PackedMatrix::int8(n, k, &w);
        g.throughput(Throughput::Bytes((n * k) as u64));
        g.bench_function(BenchmarkId::new("int8", name), |b| {
            b.iter(|| matmul(&pool, isa, black_box(&x), 1, &q, &mut out))
        });
        if n == 768 && k == 768 {
            let f = Matrix::new(n, k, w.clone());
            g.throughput(Throughput::Bytes((n * k * 4) as u64));
            g.bench_function(BenchmarkId::new("f32_reference", name), |b| {
                b.iter(|| matmul_f32(black_box(&x), 1, &f, &mut out))
            });
        }
    }
    g.finish();
}

fn gemm(c: &mut Criterion) {
    let pool = Pool::new(0);
    let isa = Isa::detect();
    let mut g = c.benchmark_group("gemm_bf16");
    g.sample_size(10);
    for rows in [16, 256] {
        for (name, n, k) in &SHAPES[..3] {
            let (n, k) = (*n, *k);
            let w = PackedMatrix::bf16(n, k, &bf16_bits(&values(n * k, 3)));
            let x = values(rows * k, 4);
            let mut out = vec![0.0; rows * n];
            g.throughput(Throughput::Elements((rows * n * k) as u64));
            g.bench_function(BenchmarkId::new(format!("rows{rows}"), name), |b| {
                b.iter(|| matmul(&pool, isa, black_box(&x), rows, &w, &mut out))
            });
        }
    }
    g.finish();
}

fn wkv(c: &mut Criterion) {
    let (h, n) = (12, 64);
    let cdim = h * n;
    let (r, k, v) = (values(cdim, 5), values(cdim, 6), values(cdim, 7));
    let w: Vec<f32> = values(cdim, 8).iter().map(|x| 0.5 + 0.45 * x).collect();
    let u = values(cdim, 9);
    let mut state = values(h * n * n, 10);
    let mut y = vec![0.0; cdim];
    let mut g = c.benchmark_group("wkv6");
    g.throughput(Throughput::Bytes((h * n * n * 8) as u64));
    g.bench_function("one_token_12x64", |b| {
        b.iter(|| {
            let inp = WkvInputs {
                r: &r,
                k: &k,
                v: &v,
                w: &w,
                u: &u,
            };
            wkv6_sequence(black_box(&inp), n, &mut state, &mut y);
        })
    });
    g.finish();
}

criterion_group!(benches, gemv, gemm, wkv);
criterion_main!(benches);
