//! The lab's "internet": an HTTP server and a UDP echo that answer every request with the source
//! address and port they saw. That answer is the truth the end-to-end tests check.
//!
//! HTTP: `GET /` → `{"src":"ADDR","port":N}`; `GET /delay/MS` → the same after MS ms (to hold
//! many connections open at once); `GET /bytes/N` → N deterministic bytes (see
//! [`payload_byte`]) with their SHA-256 in `x-payload-sha256`; `GET /trickle/N` → the same
//! paced by the server at 1 MB/s (nothing piles up in the client's buffers, so a connection
//! that dies is seen dead at once); `POST /upload` with a body →
//! `{"src":..,"port":..,"bytes":N,"sha256":"…"}` of what arrived. UDP: any datagram → the
//! same JSON as `GET /`, plus `bytes` and `sha256` of the datagram that arrived.
//! Each request is appended to the log as `tcp|udp ADDR PORT PATH`.

use std::{
    fs::OpenOptions,
    io::{BufRead, BufReader, Write},
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::fleet::hex;
use anyhow::Context as _;
use sha2::{Digest, Sha256};

/// Byte `i` of every `/bytes/N` payload; cheap, and any reordering or corruption changes the hash.
pub fn payload_byte(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// SHA-256 (hex) of the first `n` payload bytes.
pub fn payload_sha256(n: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut i = 0;
    while i < n {
        let len = (n - i).min(buf.len() as u64) as usize;
        for (k, b) in buf[..len].iter_mut().enumerate() {
            *b = payload_byte(i + k as u64);
        }
        h.update(&buf[..len]);
        i += len as u64;
    }
    hex(&h.finalize())
}

/// Runs the origin until killed: HTTP on `http_port`, UDP echo on `udp_port`, both dual-stack.
pub fn serve(http_port: u16, udp_port: u16, log: &Path) -> anyhow::Result<()> {
    let log = Arc::new(Mutex::new(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?,
    ));
    let tcp = TcpListener::bind((Ipv6Addr::UNSPECIFIED, http_port)).context("binding HTTP")?;
    // One UDP socket per origin address: a wildcard socket would answer from whatever address
    // the route picks (the fabric one), not from the address the client asked.
    // Addresses this namespace does not have are skipped (a second origin elsewhere in the lab).
    for addr in super::ORIGIN_ADDRESSES
        .into_iter()
        .filter(|a| UdpSocket::bind((*a, 0)).is_ok())
    {
        let udp =
            UdpSocket::bind((addr, udp_port)).with_context(|| format!("binding UDP {addr}"))?;
        let udp_log = log.clone();
        std::thread::spawn(move || udp_echo(udp, &udp_log));
    }
    eprintln!("ready: origin http :{http_port} udp :{udp_port}");
    for stream in tcp.incoming() {
        let Ok(stream) = stream else { continue };
        let log = log.clone();
        std::thread::spawn(move || {
            let _ = handle_http(stream, &log);
        });
    }
    Ok(())
}

fn source(addr: SocketAddr) -> (String, u16) {
    (addr.ip().to_canonical().to_string(), addr.port())
}

fn record(log: &Mutex<std::fs::File>, proto: &str, src: &(String, u16), what: &str) {
    if let Ok(mut f) = log.lock() {
        let _ = writeln!(f, "{proto} {} {} {what}", src.0, src.1);
    }
}

fn udp_echo(sock: UdpSocket, log: &Mutex<std::fs::File>) {
    let mut buf = vec![0u8; 65536];
    while let Ok((n, peer)) = sock.recv_from(&mut buf) {
        let src = source(peer);
        record(log, "udp", &src, "-");
        let body = format!(
            "{{\"src\":\"{}\",\"port\":{},\"bytes\":{n},\"sha256\":\"{}\"}}",
            src.0,
            src.1,
            hex(&Sha256::digest(&buf[..n]))
        );
        let _ = sock.send_to(body.as_bytes(), peer);
    }
}

fn handle_http(stream: TcpStream, log: &Mutex<std::fs::File>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let src = source(stream.peer_addr()?);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut body_len = 0u64;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((name, value)) = h.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            body_len = value.trim().parse().unwrap_or(0);
        }
    }
    record(log, "tcp", &src, &path);
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, stream);
    if path == "/upload" {
        stream_hash_reply(&mut reader, body_len, &src, &mut out)?;
    } else if let Some((n, paced)) = path
        .strip_prefix("/bytes/")
        .map(|n| (n, false))
        .or_else(|| path.strip_prefix("/trickle/").map(|n| (n, true)))
        .and_then(|(n, paced)| Some((n.parse::<u64>().ok()?, paced)))
    {
        write!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-length: {n}\r\nx-payload-sha256: {}\r\nconnection: close\r\n\r\n",
            payload_sha256(n)
        )?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut i = 0;
        while i < n {
            let len = (n - i).min(buf.len() as u64) as usize;
            for (k, b) in buf[..len].iter_mut().enumerate() {
                *b = payload_byte(i + k as u64);
            }
            out.write_all(&buf[..len])?;
            i += len as u64;
            if paced {
                // 64 KiB every 64 ms: 1 MB/s.
                out.flush()?;
                std::thread::sleep(Duration::from_millis(64));
            }
        }
    } else {
        if let Some(ms) = path
            .strip_prefix("/delay/")
            .and_then(|n| n.parse::<u64>().ok())
        {
            std::thread::sleep(Duration::from_millis(ms.min(10_000)));
        }
        let body = format!("{{\"src\":\"{}\",\"port\":{}}}", src.0, src.1);
        write!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )?;
    }
    out.flush()
}

/// Reads an upload of `len` bytes, hashing it, and answers with what arrived from where.
fn stream_hash_reply(
    reader: &mut impl std::io::Read,
    len: u64,
    src: &(String, u16),
    out: &mut impl Write,
) -> std::io::Result<()> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while got < len {
        let want = (len - got).min(buf.len() as u64) as usize;
        let n = reader.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n as u64;
    }
    let body = format!(
        "{{\"src\":\"{}\",\"port\":{},\"bytes\":{got},\"sha256\":\"{}\"}}",
        src.0,
        src.1,
        hex(&h.finalize())
    );
    write!(
        out,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Sends one UDP datagram to `to` and returns the answer (2 s timeout): the lab's UDP client.
pub fn udp_probe(to: SocketAddr, size: usize) -> anyhow::Result<String> {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sock = UdpSocket::bind(bind)?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let payload: Vec<u8> = (0..size as u64).map(payload_byte).collect();
    sock.send_to(&payload, to)?;
    let mut buf = [0u8; 2048];
    let (n, from) = sock
        .recv_from(&mut buf)
        .with_context(|| format!("no answer from {to}"))?;
    anyhow::ensure!(from == to, "answer came from {from}, not {to}");
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Sends UDP datagrams making `frame`-byte Ethernet frames to `to` for `seconds`, cycling the
/// destination port over `flows` ports (so many flows), from the calling thread pinned to
/// `cpu`. Returns the datagrams sent. The lab's small-packet generator.
pub fn udp_flood(
    to: SocketAddr,
    flows: u16,
    frame: usize,
    seconds: f64,
    cpu: Option<usize>,
) -> anyhow::Result<u64> {
    if let Some(cpu) = cpu {
        // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    let headers = 14 + if to.is_ipv4() { 20 } else { 40 } + 8;
    let payload = vec![0u8; frame.saturating_sub(headers).max(1)];
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sock = UdpSocket::bind(bind)?;
    let flows = flows.max(1);
    if flows == 1 {
        sock.connect(to)?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs_f64(seconds);
    let mut sent = 0u64;
    let mut dst = to;
    let mut i: u32 = 0;
    'outer: loop {
        for _ in 0..256 {
            let ok = if flows == 1 {
                sock.send(&payload).is_ok()
            } else {
                // Ports base, base+1, … base+flows-1: stays inside 1..=65535.
                let base = to.port().min(u16::MAX - flows + 1);
                dst.set_port(base + (i % u32::from(flows)) as u16);
                i = i.wrapping_add(1);
                sock.send_to(&payload, dst).is_ok()
            };
            sent += u64::from(ok);
        }
        if std::time::Instant::now() >= deadline {
            break 'outer;
        }
    }
    Ok(sent)
}
