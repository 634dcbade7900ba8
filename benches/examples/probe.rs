//! Quick kernel probe: best-of-N timings (robust on a shared, noisy machine) of the bf16/int8
//! products at 0.2B shapes. `cargo run --release -p rwkv-benches --example probe [threads]`.

use std::time::Instant;

use rwkv_cpu::ops::gemm::{matmul, Isa, PackedMatrix};
use rwkv_cpu::ops::pool::Pool;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let threads = args.first().copied().unwrap_or(0);
    let pool = Pool::new(threads);
    let isa = Isa::detect();
    println!("isa {isa:?}, threads {}", pool.threads());
    if let [_, rows, n, k, reps] = args[..] {
        // Fixed work for `perf stat -e cycles:u`: reps bf16 products of one shape.
        let x = vec![0.5f32; rows * k];
        let m = PackedMatrix::bf16(n, k, &vec![0x3f00u16; n * k]);
        let mut out = vec![0.0; rows * n];
        for _ in 0..reps {
            matmul(&pool, isa, &x, rows, &m, &mut out);
        }
        return;
    }
    for (rows, n, k) in [
        (1, 768, 768),
        (1, 2688, 768),
        (1, 65536, 768),
        (16, 768, 768),
        (16, 2688, 768),
        (16, 768, 2688),
        (16, 65536, 768),
        (256, 768, 768),
        (256, 2688, 768),
        (256, 768, 2688),
    ] {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) / 50.0)
            .collect();
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 5 % 17) as f32 - 8.0) / 9.0)
            .collect();
        let bits: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        let mut out = vec![0.0; rows * n];
        for (name, m) in [
            ("bf16", PackedMatrix::bf16(n, k, &bits)),
            ("int8", PackedMatrix::int8(n, k, &w)),
        ] {
            let reps = (2e9 / (rows * n * k) as f64).clamp(3.0, 300.0) as usize;
            let mut best = f64::MAX;
            for _ in 0..reps {
                let t = Instant::now();
                matmul(&pool, isa, &x, rows, &m, &mut out);
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{name} rows {rows:3} {n:5}x{k:4}: {:8.1} us  {:6.1} GMAC/s  {:6.1} GB/s weights",
                best * 1e6,
                (rows * n * k) as f64 / best / 1e9,
                m.bytes() as f64 / best / 1e9
            );
        }
    }
}
