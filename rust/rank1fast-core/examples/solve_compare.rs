//! Compare the exact and Krylov solves of every site of a dump (development aid):
//! `cargo run --release --example solve_compare -- DUMP [block max_dim tol]`.
use rank1fast_core::krylov::KrylovOptions;
use rank1fast_core::{
    analyze, constant_direction_with, default_ridges, AnalyzeOptions, Progress, Solver,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(&args[1]);
    let mut o = KrylovOptions::default();
    if args.len() > 4 {
        o.block = args[2].parse().unwrap();
        o.max_dim = args[3].parse().unwrap();
        o.tol = args[4].parse().unwrap();
    }
    let sites = analyze(&path, &AnalyzeOptions::default(), &Progress::default()).unwrap();
    for s in sites {
        let r = default_ridges();
        let t = std::time::Instant::now();
        let e = constant_direction_with(&s.stats, &r, &Solver::Exact).unwrap();
        let te = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let k = constant_direction_with(&s.stats, &r, &Solver::Krylov(o.clone())).unwrap();
        let tk = t.elapsed().as_secs_f64();
        println!(
            "{} d={} exact {:.6} (ridge {:.1e}, {te:.1}s) krylov {:.6} (ridge {:.1e}, k={}, steps {}, {tk:.1}s) rel {:+.4}",
            s.name, s.stats.dim, e.error, e.ridge, k.error, k.ridge, k.subspace, k.steps, k.error / e.error - 1.0
        );
    }
}
