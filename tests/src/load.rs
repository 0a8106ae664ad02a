//! Bounded loads of short TCP connections, for the SNAT test and the lab (`lab-load`): each
//! connection connects, sends a request, reads the answer's first line and closes.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a load is.
#[derive(Clone, Debug)]
pub struct Load {
    pub target: SocketAddr,
    /// Connections in all.
    pub count: usize,
    /// Connections open at once (one thread each).
    pub parallel: usize,
    /// The whole load stops after this, whatever is left.
    pub bound: Duration,
    /// Connect and read timeout of one connection.
    pub timeout: Duration,
    /// Sent after connecting (empty: nothing).
    pub request: Vec<u8>,
}

/// What a load did.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Connections attempted.
    pub done: usize,
    pub elapsed: Duration,
    /// The first lines answered, one per distinct answer, with counts.
    pub answers: Vec<(String, usize)>,
    /// "connection N: error", in order of occurrence.
    pub failures: Vec<String>,
}

impl LoadReport {
    pub fn rate(&self) -> f64 {
        // Counts stay far below 2^52: exact as f64.
        #[allow(clippy::cast_precision_loss)]
        let done = self.done as f64;
        done / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn connection(load: &Load) -> std::io::Result<String> {
    let mut stream = std::net::TcpStream::connect_timeout(&load.target, load.timeout)?;
    stream.set_read_timeout(Some(load.timeout))?;
    if !load.request.is_empty() {
        stream.write_all(&load.request)?;
    }
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::other("closed without an answer"));
    }
    Ok(line.trim().to_owned())
}

/// Runs `load` from threads made by `spawn` (e.g. [`crate::Netns::spawn`], to run inside a
/// namespace) and waits for it.
pub fn run_load<S, E>(load: &Load, spawn: S) -> Result<LoadReport, E>
where
    S: Fn(Box<dyn FnOnce() + Send>) -> Result<std::thread::JoinHandle<()>, E>,
{
    let next = Arc::new(AtomicUsize::new(0));
    let answers = Arc::new(Mutex::new(
        std::collections::BTreeMap::<String, usize>::new(),
    ));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut threads = Vec::new();
    for _ in 0..load.parallel.max(1) {
        let (load, next) = (load.clone(), next.clone());
        let (answers, failures) = (answers.clone(), failures.clone());
        threads.push(spawn(Box::new(move || {
            while started.elapsed() < load.bound {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= load.count {
                    break;
                }
                match connection(&load) {
                    Ok(line) => *answers.lock().unwrap().entry(line).or_default() += 1,
                    Err(e) => failures
                        .lock()
                        .unwrap()
                        .push(format!("connection {i}: {e}")),
                }
            }
        }))?);
    }
    for thread in threads {
        let _ = thread.join();
    }
    let done = next.load(Ordering::Relaxed).min(load.count);
    let answers = std::mem::take(&mut *answers.lock().unwrap())
        .into_iter()
        .collect();
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    Ok(LoadReport {
        done,
        elapsed: started.elapsed(),
        answers,
        failures,
    })
}
