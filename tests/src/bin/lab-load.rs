//! A bounded load of short TCP connections from the namespace it runs in, e.g. from the lab's
//! client to a NodePort: `cargo xtask lab exec client -- target/debug/lab-load
//! --to 198.18.0.12:30081 --count 50000`. Each connection sends an HTTP GET, reads the first
//! line of the answer and closes. Prints the rate and the answers; exits 1 if any failed.

use std::time::Duration;

use proxy_lab::load::{Load, run_load};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut load = Load {
        target: "127.0.0.1:80".parse().expect("literal"),
        count: 1000,
        parallel: 8,
        bound: Duration::from_mins(5),
        timeout: Duration::from_secs(5),
        request: b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n".to_vec(),
    };
    let usage = "usage: lab-load --to IP:PORT [--count N] [--parallel N] [--bound SECONDS]";
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{arg} needs a value; {usage}"));
        match arg.as_str() {
            "--to" => {
                load.target = value
                    .parse()
                    .unwrap_or_else(|_| panic!("--to {value}: not IP:PORT"));
            }
            "--count" => load.count = value.parse().expect("--count N"),
            "--parallel" => load.parallel = value.parse().expect("--parallel N"),
            "--bound" => load.bound = Duration::from_secs(value.parse().expect("--bound SECONDS")),
            _ => panic!("unknown argument {arg}; {usage}"),
        }
    }
    let report = run_load(&load, |work| {
        Ok::<_, std::io::Error>(std::thread::spawn(work))
    })
    .expect("starting the load threads");
    println!(
        "{} connections to {} in {:.1?} ({:.0}/s), {} failed",
        report.done,
        load.target,
        report.elapsed,
        report.rate(),
        report.failures.len()
    );
    for (answer, n) in &report.answers {
        println!("  {n:>6}  {answer}");
    }
    for failure in report.failures.iter().take(10) {
        println!("  failed: {failure}");
    }
    if !report.failures.is_empty() || report.done < load.count {
        std::process::exit(1);
    }
}
