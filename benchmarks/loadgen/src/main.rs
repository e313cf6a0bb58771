//! Open-loop HTTP/1.1 load generator, std only (builds offline).
//!
//! Request i is due at t0 + i/rate. Each of `--connections` threads owns one keep-alive
//! connection, takes the next due request, sleeps until it is due, sends it and reads the whole
//! response. Latency is measured from the *due* time (so a slow server cannot hide its queue —
//! the coordinated-omission correction of wrk2), service time from the send. Each metric of a
//! `server-timing: name;dur=<ms>, …` response header is collected too (`app` is the whole request in
//! the replica; /recommend adds one per stage). Prints one JSON object.
//!
//! loadgen --url http://127.0.0.1:8000/reward --body FILE --content-type T --rate 500
//!         --duration 10 --warmup 2 --connections 32

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args { host: String, port: u16, path: String, body: Vec<u8>, content_type: String, rate: f64,
              duration: f64, warmup: f64, connections: usize }

fn parse_args() -> Args {
    let mut a = Args { host: "127.0.0.1".into(), port: 8000, path: "/".into(), body: vec![],
        content_type: "application/json".into(), rate: 100.0, duration: 10.0, warmup: 1.0, connections: 32 };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i + 1 < argv.len() {
        let v = argv[i + 1].clone();
        match argv[i].as_str() {
            "--url" => {
                let rest = v.strip_prefix("http://").expect("--url must start with http://");
                let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                let (h, p) = hostport.split_once(':').unwrap_or((hostport, "80"));
                a.host = h.into(); a.port = p.parse().expect("port");
                a.path = if path.is_empty() { "/".into() } else { path.into() };
            }
            "--body" => a.body = std::fs::read(&v).expect("read --body file"),
            "--content-type" => a.content_type = v,
            "--rate" => a.rate = v.parse().expect("--rate"),
            "--duration" => a.duration = v.parse().expect("--duration"),
            "--warmup" => a.warmup = v.parse().expect("--warmup"),
            "--connections" => a.connections = v.parse().expect("--connections"),
            other => panic!("unknown flag {other}"),
        }
        i += 2;
    }
    a
}

type Timings = Vec<(String, u64)>;

#[derive(Default)]
struct Samples { latency_us: Vec<u64>, service_us: Vec<u64>, timing_us: std::collections::BTreeMap<String, Vec<u64>>,
                 errors: u64, statuses: Vec<(u16, u64)> }

/// `name;dur=ms, name;dur=ms` → [(name, µs)]. A metric with a numeric `desc` and no `dur` (a count, e.g.
/// `matching_batch;desc=4`, the requests in a micro-batch) is collected the same way: its value as if in ms.
fn parse_server_timing(v: &str, out: &mut Timings) {
    for metric in v.split(',') {
        let mut parts = metric.split(';');
        let name = parts.next().unwrap_or("").trim().to_string();
        let params: Vec<&str> = parts.map(|p| p.trim()).collect();
        let value = |key: &str| params.iter().find_map(|p| p.strip_prefix(key)).and_then(|d| d.parse::<f64>().ok());
        if let Some(ms) = value("dur=").or_else(|| value("desc=")) {
            if !name.is_empty() { out.push((name, (ms * 1000.0) as u64)); }
        }
    }
}

/// Read one HTTP/1.1 response; return (status, server-timing metrics in µs).
fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<(u16, Timings)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    if line.is_empty() { return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed")); }
    let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (mut len, mut chunked, mut timings) = (0usize, false, Vec::new());
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() { break; }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" { len = v.parse().unwrap_or(0); }
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") { chunked = true; }
            if k == "server-timing" { parse_server_timing(v, &mut timings); }
        }
    }
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
            let mut buf = vec![0u8; n + 2];
            r.read_exact(&mut buf)?;
            if n == 0 { break; }
        }
    } else {
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf)?;
    }
    Ok((status, timings))
}

fn pct(v: &mut Vec<u64>, q: f64) -> f64 {
    if v.is_empty() { return f64::NAN; }
    v.sort_unstable();
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i] as f64 / 1000.0
}

fn main() {
    let a = Arc::new(parse_args());
    let request = Arc::new([format!(
        "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n",
        a.path, a.host, a.port, a.content_type, a.body.len()).into_bytes(), a.body.clone()].concat());
    let next = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(Mutex::new(Samples::default()));
    let total = ((a.warmup + a.duration) * a.rate) as u64;
    let warm = (a.warmup * a.rate) as u64;
    let t0 = Instant::now() + Duration::from_millis(200);
    let threads: Vec<_> = (0..a.connections).map(|_| {
        let (a, request, next, samples) = (a.clone(), request.clone(), next.clone(), samples.clone());
        std::thread::spawn(move || {
            let mut local = Samples::default();
            let mut statuses = std::collections::HashMap::new();
            let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total { break; }
                let due = t0 + Duration::from_secs_f64(i as f64 / a.rate);
                let now = Instant::now();
                if due > now { std::thread::sleep(due - now); }
                let sent = Instant::now();
                let result = (|| -> std::io::Result<(u16, Timings)> {
                    if conn.is_none() {
                        let s = TcpStream::connect((a.host.as_str(), a.port))?;
                        s.set_nodelay(true)?;
                        conn = Some((s.try_clone()?, BufReader::new(s)));
                    }
                    let (w, r) = conn.as_mut().unwrap();
                    w.write_all(&request)?;
                    read_response(r)
                })();
                let done = Instant::now();
                if i < warm { if result.is_err() { conn = None; } continue; }
                match result {
                    Ok((status, timings)) => {
                        *statuses.entry(status).or_insert(0u64) += 1;
                        if !(200..300).contains(&status) { local.errors += 1; }
                        local.latency_us.push((done - due).as_micros() as u64);
                        local.service_us.push((done - sent).as_micros() as u64);
                        for (name, us) in timings { local.timing_us.entry(name).or_default().push(us); }
                    }
                    Err(_) => { local.errors += 1; conn = None; }
                }
            }
            let mut s = samples.lock().unwrap();
            s.latency_us.extend(local.latency_us);
            s.service_us.extend(local.service_us);
            for (name, v) in local.timing_us { s.timing_us.entry(name).or_default().extend(v); }
            s.errors += local.errors;
            for (k, v) in statuses { s.statuses.push((k, v)); }
        })
    }).collect();
    for t in threads { t.join().unwrap(); }
    let measured_end = Instant::now();
    let mut s = samples.lock().unwrap();
    let elapsed = (measured_end - (t0 + Duration::from_secs_f64(a.warmup))).as_secs_f64();
    let ok = s.latency_us.len() as f64 - 0.0;
    let (l50, l99, l999, lmax) = (pct(&mut s.latency_us, 0.5), pct(&mut s.latency_us, 0.99), pct(&mut s.latency_us, 0.999), pct(&mut s.latency_us, 1.0));
    let (s50, s99) = (pct(&mut s.service_us, 0.5), pct(&mut s.service_us, 0.99));
    let mut app = s.timing_us.remove("app").unwrap_or_default();
    let (a50, a99) = (pct(&mut app, 0.5), pct(&mut app, 0.99));
    let mut merged = std::collections::BTreeMap::new();
    for (k, v) in &s.statuses { *merged.entry(*k).or_insert(0u64) += v; }
    let statuses: Vec<String> = merged.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
    let num = |x: f64| if x.is_nan() { "null".to_string() } else { format!("{x:.3}") };
    let names: Vec<String> = s.timing_us.keys().cloned().collect();
    let timings: Vec<String> = names.iter().map(|n| {
        let v = s.timing_us.get_mut(n).unwrap();
        let (p50, p99) = (pct(v, 0.5), pct(v, 0.99));
        format!("\"{n}\": {{\"p50_ms\": {}, \"p99_ms\": {}}}", num(p50), num(p99))
    }).collect();
    println!("{{\"offered_rps\": {}, \"achieved_rps\": {:.1}, \"responses\": {}, \"errors\": {}, \"p50_ms\": {}, \"p99_ms\": {}, \"p999_ms\": {}, \"max_ms\": {}, \"service_p50_ms\": {}, \"service_p99_ms\": {}, \"app_p50_ms\": {}, \"app_p99_ms\": {}, \"timings\": {{{}}}, \"statuses\": {{{}}}}}",
        a.rate, ok / elapsed, ok as u64, s.errors, num(l50), num(l99), num(l999), num(lmax), num(s50), num(s99), num(a50), num(a99), timings.join(", "), statuses.join(", "));
}
