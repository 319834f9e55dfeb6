//! `cargo run --release -p flotilla-scheduler --example bench -- [nodes] [tasks] [seed]`
use flotilla_scheduler::bench::{run, BenchConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: u64| -> u64 {
        match args.get(i) {
            None => default,
            Some(a) => a.parse().unwrap_or_else(|_| {
                eprintln!("argument {} ({a:?}) must be a non-negative integer", i + 1);
                std::process::exit(2)
            }),
        }
    };
    let cfg = BenchConfig {
        nodes: arg(0, 10_000) as usize,
        tasks: arg(1, 1_000_000) as usize,
        seed: arg(2, 1),
    };
    println!("{}", run(&cfg));
}
