//! The lab's SCTP client: one association (handshake, one DATA chunk, its answer) with the
//! lab's pods through `ADDR:PORT`, from the namespace it runs in, over raw sockets (the lab's
//! kernels may have no SCTP). Prints what answered (`NAME CLIENT_IP`), or the error.
//!
//! `cargo xtask lab exec client -- target/debug/lab-sctp 198.18.0.12:30868`

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let Some(target) = std::env::args()
        .nth(1)
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        eprintln!("usage: lab-sctp ADDR:PORT");
        return ExitCode::from(2);
    };
    match proxy_lab::sctp::sctp_exchange(target, Duration::from_secs(2)) {
        Ok(answer) => {
            println!("{answer}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("SCTP association with {target}: {error}");
            ExitCode::FAILURE
        }
    }
}
