//! The HTTP gateway and /metrics of real `clonekvd` processes, through a real HTTP
//! client: the kv API, listings, every error status, watches (ttl expiry, a resume with
//! Last-Event-ID across a failover, a slow watcher cut off), concurrent writers on both
//! gateways, and the Prometheus text format.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use clonekv_tests::{wait_until, Cluster, Role, PATIENCE};
use serde_json::Value;

/// An HTTP agent that returns error statuses as responses.
fn agent(timeout: Option<Duration>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(timeout)
        .build()
        .into()
}

struct Http {
    agent: ureq::Agent,
    base: String,
}

impl Http {
    fn new(base: String) -> Http {
        Http {
            agent: agent(Some(PATIENCE)),
            base,
        }
    }

    fn get(&self, path: &str) -> (u16, Vec<u8>) {
        let response = self.agent.get(format!("{}{path}", self.base)).call();
        read(response)
    }

    fn put(&self, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let response = self.agent.put(format!("{}{path}", self.base)).send(body);
        read(response)
    }

    fn delete(&self, path: &str) -> (u16, Vec<u8>) {
        let response = self.agent.delete(format!("{}{path}", self.base)).call();
        read(response)
    }

    fn json(&self, path: &str) -> (u16, Value) {
        let (status, body) = self.get(path);
        (status, parse(&body))
    }

    /// PUT that must succeed; the sequence it was committed at. A 503 (not sent: no
    /// active server answers the gateway, as during a failover) is sent again.
    fn set(&self, key: &str, value: &str) -> i64 {
        let deadline = Instant::now() + PATIENCE;
        let (status, body) = loop {
            let (status, body) = self.put(&format!("/v1/kv{key}"), value.as_bytes());
            if status != 503 || Instant::now() > deadline {
                break (status, body);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(status, 200, "PUT {key}: {}", String::from_utf8_lossy(&body));
        parse(&body)["sequence"]
            .as_i64()
            .expect("a sequence in the answer")
    }

    /// Waits until the gateway listens and its replica is synced.
    fn wait_ready(&self) {
        wait_until("the gateway is ready", || {
            self.agent
                .get(format!("{}/healthz", self.base))
                .call()
                .is_ok_and(|response| response.status() == 200)
        });
    }
}

fn read(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Vec<u8>) {
    let mut response = response.unwrap_or_else(|error| panic!("HTTP request failed: {error}"));
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .expect("the body");
    (status, body)
}

fn parse(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|error| panic!("not JSON ({error}): {}", String::from_utf8_lossy(body)))
}

/// Asserts a JSON error answer with this status and code.
fn assert_error(answer: (u16, Vec<u8>), status: u16, code: &str) {
    let body = parse(&answer.1);
    assert_eq!(answer.0, status, "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|text| !text.is_empty()),
        "{body}"
    );
}

/// One Server-Sent Event.
#[derive(Clone, Debug)]
struct Sse {
    id: Option<i64>,
    event: String,
    data: Value,
}

/// Opens a watch and returns its events as they arrive (the channel ends with the
/// stream).
fn watch(base: &str, query: &str, last_event_id: Option<i64>) -> Receiver<Sse> {
    let mut request = agent(None).get(format!("{base}/v1/watch?{query}"));
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id.to_string());
    }
    let response = request.call().expect("the watch request");
    assert_eq!(response.status().as_u16(), 200, "watch refused");
    let reader = BufReader::new(response.into_body().into_reader());
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut id, mut event, mut data) = (None, String::new(), String::new());
        for line in reader.lines() {
            let Ok(line) = line else { return };
            if line.is_empty() {
                if !data.is_empty() {
                    let parsed = Sse {
                        id,
                        event: std::mem::take(&mut event),
                        data: parse(data.as_bytes()),
                    };
                    if sender.send(parsed).is_err() {
                        return;
                    }
                }
                data.clear();
                continue;
            }
            if let Some(value) = line.strip_prefix("id: ") {
                id = value.parse().ok();
            } else if let Some(value) = line.strip_prefix("event: ") {
                event = value.to_string();
            } else if let Some(value) = line.strip_prefix("data: ") {
                data.push_str(value);
            }
        }
    });
    receiver
}

fn next_event(events: &Receiver<Sse>) -> Sse {
    events
        .recv_timeout(PATIENCE)
        .expect("an event before the deadline")
}

fn pair_with_http(test: &str) -> (Cluster, Http, Http) {
    let mut cluster = Cluster::new(test).with_http();
    cluster.start(Role::Primary);
    cluster.start(Role::Backup);
    let primary = Http::new(cluster.http_url(Role::Primary));
    let backup = Http::new(cluster.http_url(Role::Backup));
    primary.wait_ready();
    backup.wait_ready();
    (cluster, primary, backup)
}

#[test]
fn keys_are_put_read_listed_and_deleted_with_every_error_status() {
    let (cluster, http, other) = pair_with_http("http_kv");

    let first = http.set("/weather/london", "rain");
    assert_eq!(http.get("/v1/kv/weather/london"), (200, b"rain".to_vec()));
    // Written through one gateway, read through the other once it has the update.
    wait_until("the other gateway has the key", || {
        other.get("/v1/kv/weather/london") == (200, b"rain".to_vec())
    });
    let (status, body) = http.put("/v1/kv/session/1?ttl=30s", b"\xff\x00token");
    assert_eq!(status, 200);
    let (status, meta) = http.json("/v1/kv/session/1?meta");
    assert_eq!(status, 200);
    assert_eq!(meta["key"], "/session/1");
    assert_eq!(meta["value_base64"], "/wB0b2tlbg==", "{meta}");
    assert_eq!(meta["sequence"], parse(&body)["sequence"]);
    let ttl = meta["ttl"].as_f64().expect("a ttl");
    assert!(ttl > 0.0 && ttl <= 30.0, "{meta}");
    let (_, meta) = http.json("/v1/kv/weather/london?meta");
    assert_eq!(meta["sequence"], first);
    assert_eq!(meta["ttl"], Value::Null);

    // A listing spans several pages of the replica (1000 entries each).
    let client = cluster.client().connect().expect("client");
    client.wait_synced(PATIENCE).expect("synced");
    for n in 0..2_500 {
        client
            .set(format!("/many/{n:05}"), format!("v{n}"), None)
            .expect("set");
    }
    let last = client
        .set_confirmed("/many/last", "end", None, PATIENCE)
        .expect("commit");
    drop(client);
    wait_until("the gateway has every key", || {
        http.json("/v1/status").1["gateway"]["sequence"].as_i64() >= Some(last)
    });
    let (status, listing) = http.get("/v1/kv?prefix=/many/");
    assert_eq!(status, 200);
    let lines: Vec<Value> = listing
        .split(|byte| *byte == b'\n')
        .filter(|line| !line.is_empty())
        .map(parse)
        .collect();
    assert_eq!(lines.len(), 2_501);
    assert_eq!(lines[0]["key"], "/many/00000");
    assert_eq!(lines[2_499]["value"], "v2499");
    assert_eq!(lines[2_500]["key"], "/many/last");
    let keys: BTreeSet<String> = lines
        .iter()
        .map(|line| line["key"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(keys.len(), 2_501, "no key listed twice");

    let (status, deleted) = http.delete("/v1/kv/weather/london");
    assert_eq!(status, 200);
    assert!(parse(&deleted)["sequence"].as_i64() > Some(first));
    assert_error(http.get("/v1/kv/weather/london"), 404, "not_found");
    assert_error(http.delete("/v1/kv/weather/london"), 404, "not_found");

    // Every error the API answers with, each as JSON.
    assert_error(http.put("/v1/kv/x", b""), 400, "empty_value");
    assert_error(http.put("/v1/kv/x?ttl=soon", b"v"), 400, "bad_ttl");
    assert_error(http.put("/v1/kv/x?ttl=0s", b"v"), 400, "bad_ttl");
    assert_error(http.put("/v1/kv/bad%zzkey", b"v"), 400, "bad_key");
    assert_error(http.get("/v1/kv/bad%2"), 400, "bad_key");
    let long_key = format!("/v1/kv/{}", "k".repeat(300));
    assert_error(http.put(&long_key, b"v"), 413, "key_too_long");
    assert_error(
        http.put("/v1/kv/big", &vec![b'x'; 1_048_577]),
        413,
        "value_too_large",
    );
    assert_error(http.get("/v1/nothing"), 404, "not_found");
    let (status, _) = read(
        http.agent
            .post(format!("{}/v1/kv/x", http.base))
            .send(&b"v"[..]),
    );
    assert_eq!(status, 405);
    let (status, _) = read(
        http.agent
            .get(format!("{}/v1/watch", http.base))
            .header("Last-Event-ID", "yesterday")
            .call(),
    );
    assert_eq!(status, 400);
}

#[test]
fn a_gateway_with_no_active_server_answers_503_and_a_lost_commit_504() {
    // A primary whose peer announces itself active stays passive and refuses
    // snapshots: its gateway's replica never syncs.
    let cluster = Cluster::new("http_503").with_http();
    let mut cluster = cluster;
    let context = zmq::Context::new();
    let fake_peer = context.socket(zmq::PUB).expect("socket");
    fake_peer
        .bind(&format!(
            "tcp://127.0.0.1:{}",
            cluster.state_port(Role::Backup)
        ))
        .expect("bind the fake peer's state port");
    let announcing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let still = std::sync::Arc::clone(&announcing);
    let announcer = std::thread::spawn(move || {
        while still.load(std::sync::atomic::Ordering::SeqCst) {
            // Binary Star state ACTIVE is "3".
            let _ = fake_peer.send(&b"3"[..], 0);
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    cluster.start(Role::Primary);
    let http = Http::new(cluster.http_url(Role::Primary));
    wait_until("the gateway listens", || {
        TcpStream::connect(("127.0.0.1", cluster.http_port(Role::Primary))).is_ok()
    });
    assert_error(http.get("/healthz"), 503, "no_active_server");
    assert_error(http.put("/v1/kv/x", b"v"), 503, "no_active_server");
    assert_error(http.get("/v1/kv/x"), 503, "no_active_server");
    assert_error(http.get("/v1/kv?prefix=/"), 503, "no_active_server");
    assert_error(http.get("/v1/watch?prefix=/"), 503, "no_active_server");
    announcing.store(false, std::sync::atomic::Ordering::SeqCst);
    announcer.join().expect("announcer");
    drop(cluster);

    // A synced gateway whose active stops answering: the write is sent, its commit
    // never confirmed within the (short) commit timeout.
    let cluster = Cluster::new("http_504")
        .with_http()
        .with_daemon_args(&["--http-commit-timeout", "300ms"]);
    let mut cluster = cluster;
    cluster.start(Role::Primary);
    cluster.start(Role::Backup);
    let backup = Http::new(cluster.http_url(Role::Backup));
    backup.wait_ready();
    backup.set("/before", "stop");
    cluster.daemon(Role::Primary).signal("STOP");
    assert_error(backup.put("/v1/kv/after", b"stop"), 504, "commit_timeout");
    cluster.daemon(Role::Primary).signal("CONT");
}

#[test]
fn a_watch_sees_a_ttl_expire() {
    let (_cluster, http, _) = pair_with_http("http_ttl");
    http.set("/t/keep", "v");
    let events = watch(&http.base, "prefix=/t/", None);
    let snapshot = next_event(&events);
    assert_eq!(snapshot.event, "snapshot");
    assert_eq!(snapshot.data["entries"][0]["key"], "/t/keep");
    let (status, body) = http.put("/v1/kv/t/brief?ttl=300ms", b"gone soon");
    assert_eq!(status, 200);
    let sequence = parse(&body)["sequence"].as_i64();
    let set = next_event(&events);
    assert_eq!((set.event.as_str(), set.id), ("set", sequence));
    assert_eq!(set.data["key"], "/t/brief");
    let expired = next_event(&events);
    assert_eq!(expired.event, "delete");
    assert_eq!(expired.data["key"], "/t/brief");
    assert_eq!(expired.data["deleted"], true);
    assert!(expired.id > set.id);
    assert_eq!(http.get("/v1/kv/t/brief").0, 404);
}

#[test]
fn a_watch_resumes_with_last_event_id_across_a_failover() {
    let (mut cluster, primary, backup) = pair_with_http("http_resume");
    let events = watch(&primary.base, "prefix=/f/", None);
    assert_eq!(next_event(&events).event, "snapshot");
    let mut seen: Vec<(i64, String)> = Vec::new();
    for n in 0..10 {
        backup.set(&format!("/f/{n:02}"), &format!("v{n}"));
    }
    let mut last = 0;
    while seen.len() < 10 {
        let event = next_event(&events);
        last = event.id.expect("an id");
        seen.push((last, event.data["key"].as_str().unwrap_or("?").to_string()));
    }

    // The watcher's gateway goes down with its server.
    cluster.kill(Role::Primary);
    wait_until("the watch ends with its server", || {
        matches!(
            events.recv_timeout(Duration::from_millis(100)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        )
    });
    backup.wait_ready();
    // A write in the failover's window may be sent but not confirmed (504): the
    // gateway's client may still follow the dead primary. Settle with a key outside the
    // watched prefix before the writes the watch must see exactly once.
    wait_until("a write through the backup's gateway commits", || {
        backup.put("/v1/kv/probe/settled", b"1").0 == 200
    });
    for n in 10..20 {
        backup.set(&format!("/f/{n:02}"), &format!("v{n}"));
    }
    let resumed = watch(&backup.base, "prefix=/f/", Some(last));
    while seen.len() < 20 {
        let event = next_event(&resumed);
        assert_ne!(event.event, "snapshot", "the watch did not resume");
        assert_eq!(event.event, "set", "{event:?}");
        seen.push((
            event.id.expect("an id"),
            event.data["key"].as_str().unwrap_or("?").to_string(),
        ));
    }
    let keys: Vec<String> = seen.iter().map(|(_, key)| key.clone()).collect();
    let expected: Vec<String> = (0..20).map(|n| format!("/f/{n:02}")).collect();
    assert_eq!(keys, expected, "every change once, in order");
    assert!(
        seen.windows(2).all(|pair| pair[0].0 < pair[1].0),
        "ids increase: {seen:?}"
    );
    assert!(
        resumed.recv_timeout(Duration::from_millis(300)).is_err(),
        "nothing repeated after the last change"
    );
}

#[test]
fn writers_on_both_gateways_at_once_all_commit() {
    let (_cluster, primary, backup) = pair_with_http("http_writers");
    let writers: Vec<_> = [(primary.base.clone(), "p"), (backup.base.clone(), "b")]
        .into_iter()
        .map(|(base, name)| {
            std::thread::spawn(move || {
                let http = Http::new(base);
                (0..100)
                    .map(|n| {
                        // Distinct keys, and one key both write.
                        let own = http.set(&format!("/w/{name}/{n:03}"), &format!("{n}"));
                        let shared = http.set("/w/shared", &format!("{name}{n}"));
                        (own, shared)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut sequences = BTreeSet::new();
    for writer in writers {
        for (own, shared) in writer.join().expect("writer") {
            assert!(sequences.insert(own), "sequence {own} given twice");
            assert!(sequences.insert(shared), "sequence {shared} given twice");
        }
    }
    assert_eq!(sequences.len(), 400);
    let listing = |http: &Http| -> BTreeMap<String, String> {
        let (status, body) = http.get("/v1/kv?prefix=/w/");
        assert_eq!(status, 200);
        body.split(|byte| *byte == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| {
                let entry = parse(line);
                (
                    entry["key"].as_str().unwrap_or_default().to_string(),
                    entry["value"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    let highest = *sequences.last().expect("sequences");
    wait_until("both gateways have every write", || {
        [&primary, &backup]
            .iter()
            .all(|http| http.json("/v1/status").1["gateway"]["sequence"].as_i64() >= Some(highest))
    });
    let from_primary = listing(&primary);
    assert_eq!(from_primary.len(), 201);
    assert_eq!(from_primary, listing(&backup));
}

#[test]
fn a_slow_watcher_is_cut_off() {
    let cluster = Cluster::new("http_slow").with_http().with_daemon_args(&[
        "--http-watch-queue",
        "8",
        "--http-write-timeout",
        "1s",
    ]);
    let mut cluster = cluster;
    cluster.start(Role::Primary);
    cluster.start(Role::Backup);
    let http = Http::new(cluster.http_url(Role::Primary));
    http.wait_ready();
    // A watcher that sends its request and then reads nothing.
    let mut stalled =
        TcpStream::connect(("127.0.0.1", cluster.http_port(Role::Primary))).expect("connect");
    stalled
        .write_all(b"GET /v1/watch?prefix=/slow/ HTTP/1.1\r\nHost: test\r\n\r\n")
        .expect("request");
    wait_until("the watch is open", || {
        scrape(&http).get("clonekv_http_watchers") == Some(&1.0)
    });
    // Far more than the socket buffers and the queue hold.
    let client = cluster.client().connect().expect("client");
    client.wait_synced(PATIENCE).expect("synced");
    let value = vec![b'x'; 64 * 1024];
    for n in 0..600 {
        client
            .set(format!("/slow/{n:04}"), &value, None)
            .expect("set");
    }
    client
        .set_confirmed("/slow/end", "end", None, PATIENCE)
        .expect("commit");
    wait_until("the watcher is cut off", || {
        let metrics = scrape(&http);
        metrics.get("clonekv_http_watchers") == Some(&0.0)
            && metrics.get("clonekv_http_watchers_ended_total{reason=too_slow}") == Some(&1.0)
    });
    // Its connection ends: what it still reads is what the buffers held, then EOF.
    stalled
        .set_read_timeout(Some(PATIENCE))
        .expect("read timeout");
    let mut received = Vec::new();
    let started = Instant::now();
    let _ = stalled.read_to_end(&mut received);
    assert!(started.elapsed() < PATIENCE, "the connection stayed open");
    assert!(
        received.len() < 600 * 64 * 1024,
        "the watcher was sent everything ({} bytes)",
        received.len()
    );
}

/// The gateway's /metrics, parsed as the Prometheus text format, keyed by the metric
/// name with its labels as `{name=value,...}` (sorted).
fn scrape(http: &Http) -> BTreeMap<String, f64> {
    let (status, body) = http.get("/metrics");
    assert_eq!(status, 200);
    let text = String::from_utf8(body).expect("UTF-8");
    let lines = text.lines().map(|line| Ok(line.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("the Prometheus text format");
    scrape
        .samples
        .into_iter()
        .map(|sample| {
            let mut labels: Vec<String> = sample
                .labels
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect();
            labels.sort();
            let name = if labels.is_empty() {
                sample.metric
            } else {
                format!("{}{{{}}}", sample.metric, labels.join(","))
            };
            let value = match sample.value {
                prometheus_parse::Value::Counter(value)
                | prometheus_parse::Value::Gauge(value)
                | prometheus_parse::Value::Untyped(value) => value,
                _ => f64::NAN,
            };
            (name, value)
        })
        .collect()
}

#[test]
fn metrics_are_in_the_prometheus_text_format_with_or_without_the_gateway() {
    let (cluster, http, _) = pair_with_http("http_metrics");
    for n in 0..5 {
        http.set(&format!("/m/{n}"), "value");
    }
    assert_eq!(http.get("/v1/kv/m/nope").0, 404);
    wait_until("the stats are refreshed", || {
        scrape(&http).get("clonekv_keys") == Some(&5.0)
    });
    let metrics = scrape(&http);
    let value = |name: &str| {
        *metrics
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {metrics:#?}"))
    };
    assert!(value("clonekv_updates_published_total") >= 5.0);
    // Charged as --max-bytes counts: keys, values, properties and 256 bytes per key.
    let map_bytes = value("clonekv_map_bytes");
    assert!(
        (5.0 * (256.0 + 4.0 + 5.0)..5.0 * (256.0 + 4.0 + 5.0 + 64.0)).contains(&map_bytes),
        "{map_bytes}"
    );
    assert_eq!(value("clonekv_bstar_state{state=active}"), 1.0);
    assert_eq!(value("clonekv_bstar_state{state=passive}"), 0.0);
    assert_eq!(value("clonekv_peer_bstar_state{state=passive}"), 1.0);
    assert_eq!(value("clonekv_peer_alive"), 1.0);
    assert_eq!(value("clonekv_role{role=primary}"), 1.0);
    assert!(value("clonekv_snapshot_streams_completed_total") >= 1.0);
    assert_eq!(value("clonekv_pending_entries"), 0.0);
    assert_eq!(
        value("clonekv_http_requests_total{method=PUT,route=/v1/kv/:key,status=200}"),
        5.0
    );
    assert_eq!(
        value("clonekv_http_requests_total{method=GET,route=/v1/kv/:key,status=404}"),
        1.0
    );
    drop(cluster);

    // --metrics alone: /metrics and nothing else.
    let mut lone = Cluster::new("http_metrics_only");
    let port = lone.http_port(Role::Primary);
    lone = lone.with_daemon_args(&["--metrics", &format!("127.0.0.1:{port}")]);
    lone.start(Role::Primary);
    let metrics_only = Http::new(format!("http://127.0.0.1:{port}"));
    wait_until("the metrics listener answers", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let metrics = scrape(&metrics_only);
    assert!(metrics.contains_key("clonekv_sequence"), "{metrics:#?}");
    assert_eq!(metrics_only.get("/v1/kv/x").0, 404);
}
