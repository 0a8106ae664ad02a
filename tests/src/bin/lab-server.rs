//! The lab's pod: answers every HTTP request on each `--port` with its pod name and the client
//! address it saw (`pod=NAME client=IP:PORT`), echoes the same line to UDP datagrams on the
//! same ports, and answers SCTP associations there (`NAME IP`, see `proxy_lab::sctp`; `lab-sctp`
//! is the client). Runs until killed.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};

fn answer(pod: &str, client: SocketAddr) -> String {
    // Dual-stack sockets report IPv4 clients as ::ffff:a.b.c.d; print them as IPv4.
    let client = SocketAddr::new(client.ip().to_canonical(), client.port());
    format!("pod={pod} client={client}\n")
}

fn serve_http(pod: &str, mut stream: TcpStream) -> std::io::Result<()> {
    let client = stream.peer_addr()?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    // Read the request head (we answer whatever was asked).
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        if line == "\r\n" || line == "\n" {
            break;
        }
        line.clear();
    }
    let body = answer(pod, client);
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut pod = String::from("pod");
    let mut ports = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--name" => pod = args.next().expect("--name NAME"),
            "--port" => ports.push(
                args.next()
                    .and_then(|p| p.parse::<u16>().ok())
                    .expect("--port PORT"),
            ),
            other => {
                panic!("unknown argument {other}; usage: lab-server --name NAME --port PORT...")
            }
        }
    }
    let mut threads = Vec::new();
    let mut sctp = Vec::new();
    for port in ports {
        sctp.push(
            proxy_lab::sctp::SctpServer::start_here(&pod, port)
                .map_err(|e| std::io::Error::other(e.to_string()))?,
        );
        let listener = TcpListener::bind(("::", port))?;
        let udp = UdpSocket::bind(("::", port))?;
        let (tcp_pod, udp_pod) = (pod.clone(), pod.clone());
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let pod = tcp_pod.clone();
                std::thread::spawn(move || serve_http(&pod, stream));
            }
        }));
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((_, client)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(answer(&udp_pod, client).as_bytes(), client);
            }
        }));
    }
    println!("lab-server {pod} ready");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
