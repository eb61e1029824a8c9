//! Speed of the second-moment kernel in the call pattern of `analyze` (one thread, CPU time):
//! `cargo run --release --example gram_calls [DIM] [ROWS_PER_CALL] [CALLS] [KERNEL]`.
//! The same rows are added `CALLS` times, in turn to `FOLDS` matrices (default 5, as analyze's
//! fold matrices); `HUGE=1` backs them with huge pages, as analyze does.
use rank1fast_core::gram::{Gram, Kernel};
use std::time::Instant;

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let d: usize = a.get(1).and_then(|v| v.parse().ok()).unwrap_or(1536);
    let per: usize = a.get(2).and_then(|v| v.parse().ok()).unwrap_or(512);
    let calls: usize = a.get(3).and_then(|v| v.parse().ok()).unwrap_or(40);
    let kernel = a
        .get(4)
        .and_then(|v| Kernel::from_name(v))
        .unwrap_or(Kernel::detect(false));
    let x: Vec<f32> = (0..per * d)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let x: Vec<f32> = if kernel.bf16() {
        x.iter()
            .map(|&v| f32::from_bits((v.to_bits() + 0x8000) & 0xffff_0000))
            .collect()
    } else {
        x
    };
    let shift = kernel.shift(&vec![0.25f32; d]);
    let mut gram = Gram::with_kernel(d, kernel);
    // Five fold matrices used in turn, as analyze does (FOLDS=1: one).
    let folds: usize = std::env::var("FOLDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut g = vec![0f64; folds * d * d];
    if std::env::var("HUGE").is_ok() {
        // As analyze's fold matrices (`stats::zeroed_large`): transparent huge pages.
        let huge = 2usize << 20;
        let start = (g.as_ptr() as usize).div_ceil(huge) * huge;
        let end = (g.as_ptr() as usize + folds * d * d * 8) / huge * huge;
        if end > start {
            // SAFETY: the range lies inside `g`'s allocation; advice only.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
        for v in g.iter_mut() {
            // SAFETY: a valid element; volatile so the zero store faults the page in now.
            unsafe { std::ptr::write_volatile(v, 0.0) };
        }
    }
    let dd = d * d;
    for k in 0..folds {
        gram.add(&x, &shift, &mut g[k * dd..(k + 1) * dd]);
    }
    let (t, c) = (Instant::now(), cpu_seconds());
    for i in 0..calls {
        let k = i % folds;
        gram.add(&x, &shift, &mut g[k * dd..(k + 1) * dd]);
    }
    let (wall, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
    let useful = (calls * per * d * d) as f64;
    println!(
        "d={d} rows/call={per} calls={calls} {}: {:.1} GFLOP/s CPU, {:.1} wall",
        kernel.name(),
        useful / cpu / 1e9,
        useful / wall / 1e9
    );
}
