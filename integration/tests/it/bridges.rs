//! Issue #8: the device bridges against real peers — a Mosquitto broker (Debian's package,
//! installed by `make test`) and a Modbus TCP device served by pymodbus (PyPI) — with the
//! bridges running inside a real node (its RocksDB log, its status).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strata_core::config::NodeConfig;
use strata_core::log::Draft;
use strata_core::node::Node;
use strata_core::{Kind, PayloadType, StreamName};
use strata_integration::{free_port, payloads, repo_root};

use crate::replication::serial;

/// A Mosquitto broker on a loopback port with a temporary config and persistence (so a
/// stopped broker keeps the sessions and queued messages it had, as a production one does).
struct Broker {
    port: u16,
    conf: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// `extra`: more config (further listeners) after the plain anonymous listener.
    fn new(dir: &Path, extra: &str) -> Broker {
        let port = free_port();
        // Per-listener security only where a second listener needs its own: with it, Mosquitto
        // 2.0.12 and later drop QoS 1 messages for a persistent session while its client is
        // disconnected (eclipse-mosquitto/mosquitto#2618), which is what the restart test is about.
        let per_listener = if extra.is_empty() { "false" } else { "true" };
        let store = dir.join("mosquitto");
        std::fs::create_dir_all(&store).unwrap();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings {per_listener}\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nautosave_interval 1\n\
                 # Started as root (CI), it would switch to the `mosquitto` user, who cannot write the test's\n\
                 # temporary directory: stay as the user that started it.\nuser {user}\nlog_type all\n\
                 max_queued_messages 100000\nlog_dest file {}\n{extra}",
                store.display(),
                dir.join("mosquitto.log").display(),
                user = std::env::var("USER").unwrap_or_else(|_| "root".into()),
            ),
        )
        .unwrap();
        Broker { port, conf, child: None }
    }

    fn start(&mut self) {
        let child = Command::new(mosquitto()).arg("-c").arg(&self.conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it the way an operator does (SIGTERM: it saves its state) and waits.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn mosquitto() -> &'static str {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"].into_iter().find(|p| Path::new(p).exists()).expect("mosquitto is installed (`make test` installs it)")
}

/// Messages a test client received: (topic, payload), in arrival order.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// An MQTT test client (persistent session, QoS 1) whose event loop runs in a task; received
/// messages are collected.
struct Client {
    client: rumqttc::AsyncClient,
    received: Received,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    async fn new(id: &str, port: u16, subscribe: Option<&str>) -> Client {
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5)).set_clean_session(false);
        // Room for the oversized message the test sends (the default is 10 KiB).
        o.set_max_packet_size(1 << 21, 1 << 21);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 20_000);
        let received = Arc::new(Mutex::new(Vec::new()));
        let (r, c, filter) = (received.clone(), client.clone(), subscribe.map(str::to_owned));
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        if let Some(f) = &filter {
                            let _ = c.subscribe(f, rumqttc::QoS::AtLeastOnce).await;
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => r.lock().unwrap().push((p.topic.clone(), p.payload.to_vec())),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Client { client, received, task }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A node `edge-1` storing in `dir`, then `actors`.
fn node_config(dir: &Path, actors: &str) -> String {
    format!(
        "[node]\nid = \"edge-1\"\ntier = \"edge\"\ndata_dir = \"{}\"\n[zenoh]\nlisten = [\"tcp/127.0.0.1:{}\"]\n{actors}",
        dir.join("edge-1-data").display(),
        free_port()
    )
}

fn mqtt_actors(broker: u16) -> String {
    format!(
        r#"[[actors]]
kind = "mqtt"
name = "plant"
inputs = ["commands"]
outputs = ["readings/p1", "readings/p2"]
[actors.params]
host = "127.0.0.1"
port = {broker}
command_topic = "plant/cmd/{{action}}"
command_expiry_ms = 60000
reconnect_max_ms = 1000
[[actors.params.readings]]
topic = "plant/+/temp"
stream = "readings/{{1}}"
value = "/c"
ts = "/ts"
min = -1
max = 100000
[[actors]]
kind = "mqtt"
name = "plant-v5"
inputs = ["commands-short"]
[actors.params]
host = "127.0.0.1"
port = {broker}
protocol = "5"
command_topic = "plant/short/{{action}}"
command_expiry_ms = 2000
reconnect_max_ms = 1000
"#
    )
}

fn command(key: &str, action: &str) -> Draft {
    let doc = json!({"key": key, "action": action});
    Draft::new(Kind::Command, PayloadType::new("strata.command/1").unwrap(), doc.to_string().into_bytes())
}

fn report(status: &Value, actor: &str) -> Value {
    status["reports"][actor].clone()
}

async fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

const READINGS: u64 = 10_000;

/// `[1, 2, 3, 7]` as `1-3 7`.
fn ranges(sorted: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        out.push(if i == j { sorted[i].to_string() } else { format!("{}-{}", sorted[i], sorted[j]) });
        i = j + 1;
    }
    out.join(" ")
}
const COMMANDS: u64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_readings_and_commands_survive_a_broker_restart() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::new(dir.path(), "");
    broker.start();
    let config = NodeConfig::parse("edge-1.toml".as_ref(), &node_config(dir.path(), &mqtt_actors(broker.port))).unwrap();
    let mut registry = strata_actors::registry();
    strata_bridges::register(&mut registry);
    let node = Node::start(config, &registry).await.unwrap();
    let connected = |doc: &Value| report(doc, "plant")["connected"] == true && report(doc, "plant-v5")["connected"] == true;
    assert!(wait_status(&node, Duration::from_secs(20), connected).await, "bridges never connected: {}", node.status().await["reports"]);
    let subscriber = Client::new("test-sub", broker.port, Some("plant/#")).await;
    let publisher = Client::new("test-pub", broker.port, None).await;
    // Let the subscriber's session exist before the commands flow.
    assert!(wait_for(Duration::from_secs(10), || subscriber.client.try_publish("plant/hello", rumqttc::QoS::AtMostOnce, false, "x").is_ok()).await);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Malformed payloads: each rejected with its reason, the bridge keeps going.
    let bad = [
        ("plant/p1/temp", "not json"),
        ("plant/p1/temp", r#"{"f": 1}"#),
        ("plant/p1/temp", r#"{"c": "hot"}"#),
        ("plant/p1/temp", r#"{"c": -50}"#),
        ("plant/p3/temp", r#"{"c": 1}"#),
    ];
    for (topic, payload) in bad {
        publisher.client.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload).await.unwrap();
    }
    // Over payload_bytes_max (64 KiB) but within packet_bytes_max (1 MiB): read, rejected as
    // too_large and acknowledged; the messages after it still come.
    let big = format!(r#"{{"c": 1, "pad": "{}"}}"#, "x".repeat(200 * 1024));
    publisher.client.publish("plant/p1/temp", rumqttc::QoS::AtLeastOnce, false, big).await.unwrap();

    // 10,000 readings over ~20 s and 100 commands, with the broker down for 10 s in the middle.
    let log = node.log().clone();
    let commands = tokio::spawn(async move {
        // Its topic would be "plant/cmd/+": no publish can use it. Rejected and recorded; the
        // commands after it still go.
        log.append_durable(StreamName::new("commands").unwrap(), command("wildcard", "+")).await.unwrap();
        for i in 0..COMMANDS {
            log.append_durable(StreamName::new("commands").unwrap(), command(&format!("cmd-{i}"), "set")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    });
    let pacing = Duration::from_micros(2_000);
    let t0 = Instant::now();
    let mut stopped_at = None;
    for n in 0..READINGS {
        let topic = if n % 2 == 0 { "plant/p1/temp" } else { "plant/p2/temp" };
        let payload = json!({"c": n as f64, "ts": 1_700_000_000_000u64 + n}).to_string();
        publisher.client.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload).await.unwrap();
        if n == READINGS / 4 {
            broker.stop();
            stopped_at = Some(Instant::now());
        }
        if stopped_at.is_some_and(|s| s.elapsed() >= Duration::from_secs(10)) && broker.child.is_none() {
            broker.start();
        }
        tokio::time::sleep_until((t0 + pacing * n as u32).into()).await;
    }
    if broker.child.is_none() {
        let wait = Duration::from_secs(10).saturating_sub(stopped_at.unwrap().elapsed());
        tokio::time::sleep(wait).await;
        broker.start();
    }
    commands.await.unwrap();

    // Everything arrives: readings in the log, commands at the subscriber.
    let data_dir = dir.path().join("edge-1-data");
    let stored = || -> BTreeMap<u64, usize> {
        let mut seen = BTreeMap::new();
        for stream in ["readings/p1", "readings/p2"] {
            for doc in payloads_live(&node, stream) {
                *seen.entry(doc["value"].as_f64().unwrap() as u64).or_insert(0) += 1;
            }
        }
        seen
    };
    let keys = |client: &Client| -> BTreeMap<String, usize> {
        let mut k = BTreeMap::new();
        for (topic, payload) in client.received.lock().unwrap().iter().filter(|(t, _)| t.starts_with("plant/cmd/")) {
            assert_eq!(topic, "plant/cmd/set");
            let doc: Value = serde_json::from_slice(payload).unwrap();
            *k.entry(doc["key"].as_str().unwrap().to_owned()).or_insert(0) += 1;
        }
        k
    };
    let caught_up = wait_for(Duration::from_secs(60), || stored().len() as u64 == READINGS && keys(&subscriber).len() as u64 == COMMANDS).await;
    let status = node.status().await;
    let plant = report(&status, "plant");
    let (seen, delivered) = (stored(), keys(&subscriber));
    let accepted = plant["counters"]["accepted"].as_u64().unwrap_or(0);
    let stored_total: usize = seen.values().sum();
    report!(
        "mqtt: published {READINGS} / accepted {accepted} / stored {stored_total} ({} distinct, {} stored twice) / lost {}; \
         commands appended {COMMANDS} / sent {} / delivered {} distinct ({} repeats) / expired {}; broker down 10 s",
        seen.len(),
        seen.values().filter(|c| **c > 1).count(),
        READINGS - seen.len() as u64,
        plant["counters"]["commands_sent"],
        delivered.len(),
        delivered.values().map(|c| c - 1).sum::<usize>(),
        plant["counters"]["commands_expired"].as_u64().unwrap_or(0),
    );
    if !caught_up {
        let at_subscriber: BTreeSet<u64> = subscriber
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t.ends_with("/temp"))
            .filter_map(|(_, p)| serde_json::from_slice::<Value>(p).ok()?["c"].as_f64().map(|c| c as u64))
            .collect();
        eprintln!("the test's subscriber saw {} distinct readings through the broker", at_subscriber.len());
        let stored_now = stored();
        let missing: Vec<u64> = (0..READINGS).filter(|n| !stored_now.contains_key(n)).collect();
        eprintln!("readings the log misses ({}; the broker went down after reading {}): {}", missing.len(), READINGS / 4, ranges(&missing));
        let log = std::fs::read_to_string(dir.path().join("mosquitto.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!("mosquitto.log (last lines, newest first):\n{}", tail.join("\n"));
    }
    assert!(caught_up, "not everything arrived: {} readings, {} commands; report {plant}", seen.len(), delivered.len());
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), (0..READINGS).collect::<Vec<_>>(), "every reading, with its value");
    assert_eq!(delivered.keys().cloned().collect::<BTreeSet<_>>(), (0..COMMANDS).map(|i| format!("cmd-{i}")).collect(), "every command");
    // Readings carry the device's timestamp.
    let first = payloads(&data_dir, "readings/p1");
    assert!(first.is_empty() || first.iter().all(|d| d["ts_ms"].as_u64().unwrap() >= 1_700_000_000_000), "device timestamps kept");
    // The broker restart was seen and is in status.
    assert!(plant["reconnects"].as_u64().unwrap() >= 1 && plant["connected"] == true, "{plant}");
    // Each malformed payload was rejected with its reason, and the bridge kept running.
    let rejected = &plant["rejected"];
    for reason in ["not_json", "missing_field", "bad_value", "out_of_range", "stream_not_in_outputs", "too_large", "bad_command"] {
        assert_eq!(rejected[reason], 1, "{reason}: {rejected}");
    }
    let wildcard = payloads_live(&node, "events").into_iter().filter(|e| e["event"] == "command_rejected").collect::<Vec<_>>();
    assert!(wildcard.len() == 1 && wildcard[0]["key"] == "wildcard", "{wildcard:?}");

    // Store-and-forward with expiry (MQTT 5 bridge): commands appended while the broker is
    // down wait; one older than command_expiry_ms when the broker returns is recorded as
    // expired, never sent.
    broker.stop();
    assert!(wait_status(&node, Duration::from_secs(10), |d| report(d, "plant-v5")["connected"] == false).await);
    for i in 0..3 {
        node.log().append_durable(StreamName::new("commands-short").unwrap(), command(&format!("late-{i}"), "stop")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    broker.start();
    node.log().append_durable(StreamName::new("commands-short").unwrap(), command("fresh", "stop")).await.unwrap();
    let short = |client: &Client| -> Vec<String> {
        client
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t.starts_with("plant/short/"))
            .map(|(_, p)| serde_json::from_slice::<Value>(p).unwrap()["key"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(wait_for(Duration::from_secs(30), || short(&subscriber).contains(&"fresh".to_string())).await, "the fresh command is sent after the restart");
    let v5 = report(&node.status().await, "plant-v5");
    let events: Vec<Value> = payloads_live(&node, "events").into_iter().filter(|e| e["event"] == "command_expired").collect();
    report!(
        "mqtt 5: commands appended 4 / expired {} / sent {} / delivered {:?}",
        v5["counters"]["commands_expired"],
        v5["counters"]["commands_sent"],
        short(&subscriber)
    );
    assert_eq!(v5["counters"]["commands_expired"], 3, "{v5}");
    assert_eq!(short(&subscriber), vec!["fresh".to_string()], "expired commands are not sent");
    assert_eq!(events.iter().map(|e| e["key"].as_str().unwrap()).collect::<BTreeSet<_>>(), ["late-0", "late-1", "late-2"].into_iter().collect());
    let connection_events = payloads_live(&node, "events").iter().filter(|e| e["event"] == "bridge_disconnected" && e["actor"] == "plant").count();
    assert!(connection_events >= 1, "connection changes are events");
    node.shutdown().await;
}

/// The payloads of one of the running node's own streams.
fn payloads_live(node: &Node, stream: &str) -> Vec<Value> {
    let log = node.log();
    let key = log.local_key(&StreamName::new(stream).unwrap());
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let batch = log.read(&key, from, 4096).unwrap();
        let Some(last) = batch.last() else { break };
        from = last.id.seq.get() + 1;
        out.extend(batch.iter().filter_map(|e| serde_json::from_slice(&e.payload).ok()));
    }
    out
}

/// Waits until the node's status satisfies `cond`.
async fn wait_status(node: &Node, timeout: Duration, cond: impl Fn(&Value) -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond(&node.status().await) {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// pymodbus serving known registers (integration/tests/devices/modbus_server.py).
struct Device(Child);

impl Device {
    fn start(port: u16) -> Device {
        let script = repo_root().join("integration/tests/devices/modbus_server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs the pymodbus device (`make test` installs pymodbus)");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the pymodbus device did not start (is pymodbus installed?)");
        Device(child)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_polls_registers_and_writes_commands() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _device = Device::start(port);
    let actors = format!(
        r#"[[actors]]
kind = "modbus"
name = "plc"
inputs = ["commands"]
outputs = ["readings/temp", "readings/count", "readings/offset", "readings/total", "readings/running", "readings/missing", "readings/fault"]
[actors.params]
host = "127.0.0.1"
port = {port}
poll_interval_ms = 100
[[actors.params.points]]
stream = "readings/temp"
table = "holding"
address = 0
type = "f32"
[[actors.params.points]]
stream = "readings/count"
table = "holding"
address = 2
scale = 0.1
[[actors.params.points]]
stream = "readings/offset"
table = "holding"
address = 3
type = "i16"
offset = 100
[[actors.params.points]]
stream = "readings/total"
table = "input"
address = 0
type = "u32"
word_order = "little"
[[actors.params.points]]
stream = "readings/running"
table = "coil"
address = 0
[[actors.params.points]]
stream = "readings/missing"
table = "holding"
address = 500
[[actors.params.points]]
stream = "readings/fault"
table = "holding"
address = 4
type = "f32"
[[actors.params.writes]]
action = "stop"
address = 10
value = 1
[[actors.params.writes]]
action = "setpoint"
address = 12
type = "f32"
"#
    );
    let mut registry = strata_actors::registry();
    strata_bridges::register(&mut registry);
    let node = Node::start(NodeConfig::parse("edge-1.toml".as_ref(), &node_config(dir.path(), &actors)).unwrap(), &registry).await.unwrap();
    let last = |stream: &str| payloads_live(&node, stream).last().map(|d| d["value"].as_f64().unwrap());
    assert!(wait_for(Duration::from_secs(20), || last("readings/running").is_some() && last("readings/temp").is_some()).await, "no readings polled");
    let polled: Vec<(&str, f64)> =
        ["temp", "count", "offset", "total", "running"].iter().map(|s| (*s, last(&format!("readings/{s}")).unwrap_or(f64::NAN))).collect();
    report!("modbus: polled {polled:?}");
    // The device's registers: f32 21.5, u16 1234 (x 0.1), i16 -7 (+ 100), u32 65538 (low word
    // first), coil on.
    for ((name, got), want) in polled.iter().zip([21.5, 123.4, 93.0, 65_538.0, 1.0]) {
        assert!((got - want).abs() < 1e-9, "{name}: polled {got}, the device holds {want}");
    }
    assert!(last("readings/missing").is_none(), "a register the device does not have gives no reading");
    assert!(payloads_live(&node, "readings/fault").is_empty(), "a NaN register is refused, not stored as null");

    // Commands write the expected registers (read back with a client of our own).
    node.log().append_durable(StreamName::new("commands").unwrap(), command("c-1", "stop")).await.unwrap();
    let doc = json!({"key": "c-2", "action": "setpoint", "value": 42.25});
    let draft = Draft::new(Kind::Command, PayloadType::new("strata.command/1").unwrap(), doc.to_string().into_bytes());
    node.log().append_durable(StreamName::new("commands").unwrap(), draft).await.unwrap();
    node.log().append_durable(StreamName::new("commands").unwrap(), command("c-3", "launch")).await.unwrap();
    // The three commands are handled in order: wait until the last one (unknown) is counted too,
    // not only the two writes, or the status read below can fall between them.
    let handled = |d: &Value| report(d, "plc")["counters"]["commands_written"] == 2 && report(d, "plc")["rejected"]["unknown_action"] == 1;
    assert!(wait_status(&node, Duration::from_secs(20), handled).await, "{}", report(&node.status().await, "plc"));
    use tokio_modbus::client::Reader;
    let mut client = tokio_modbus::client::tcp::connect(format!("127.0.0.1:{port}").parse().unwrap()).await.unwrap();
    let regs = client.read_holding_registers(10, 4).await.unwrap().unwrap();
    assert_eq!(regs[0], 1, "stop wrote 1 to register 10");
    assert_eq!(f32::from_bits(u32::from(regs[2]) << 16 | u32::from(regs[3])), 42.25, "setpoint wrote 42.25 to registers 12-13");

    // Exceptions and unknown commands are counted by reason; the bridge keeps polling.
    let plc = report(&node.status().await, "plc");
    report!("modbus: {plc}");
    assert!(plc["rejected"]["exception_illegal_data_address"].as_u64().unwrap() >= 1, "{plc}");
    assert_eq!(plc["rejected"]["unknown_action"], 1, "{plc}");
    assert!(plc["rejected"]["bad_value"].as_u64().unwrap() >= 1, "the NaN register is counted: {plc}");
    let polls = plc["counters"]["polls"].as_u64().unwrap();
    assert!(wait_status(&node, Duration::from_secs(10), |d| report(d, "plc")["counters"]["polls"].as_u64().unwrap() > polls + 2).await, "still polling");
    assert_eq!(report(&node.status().await, "plc")["connected"], true);
    node.shutdown().await;
}

/// Runs a command of the test's set-up; panics with its output if it fails.
fn run(program: &str, args: &[&str], dir: &Path) {
    let out = Command::new(program).args(args).current_dir(dir).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_bridge_connects_with_tls_and_a_password() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A CA and a broker certificate for localhost, made with the openssl command line.
    run("openssl", &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca"], d);
    run("openssl", &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr", "-subj", "/CN=localhost"], d);
    std::fs::write(d.join("san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            "broker.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "broker.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
        d,
    );
    run("mosquitto_passwd", &["-b", "-c", "passwd", "gateway", "s3cret"], d);
    let tls_port = free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {0}/ca.pem\ncertfile {0}/broker.pem\nkeyfile {0}/broker.key\nallow_anonymous false\npassword_file {0}/passwd\n",
        d.display()
    );
    let mut broker = Broker::new(d, &extra);
    broker.start();
    let bridge = |name: &str, password: &str| {
        format!(
            "[[actors]]\nkind = \"mqtt\"\nname = \"{name}\"\noutputs = [\"readings/{name}\"]\n[actors.params]\nhost = \"localhost\"\nport = {tls_port}\n\
             username = \"gateway\"\npassword = \"{password}\"\nreconnect_max_ms = 500\ntls = {{ ca_path = \"{}/ca.pem\" }}\n\
             [[actors.params.readings]]\ntopic = \"secure/{name}\"\nstream = \"readings/{name}\"\n",
            d.display()
        )
    };
    let actors = format!("{}{}", bridge("good", "s3cret"), bridge("wrong", "guess"));
    let mut registry = strata_actors::registry();
    strata_bridges::register(&mut registry);
    let node = Node::start(NodeConfig::parse("edge-1.toml".as_ref(), &node_config(d, &actors)).unwrap(), &registry).await.unwrap();
    assert!(wait_status(&node, Duration::from_secs(20), |d| report(d, "good")["connected"] == true).await, "{}", node.status().await["reports"]);

    // Readings published on the plain listener reach the bridge over TLS.
    let publisher = Client::new("test-pub-tls", broker.port, None).await;
    for n in 0..100 {
        publisher.client.publish("secure/good", rumqttc::QoS::AtLeastOnce, false, format!("{n}")).await.unwrap();
    }
    assert!(wait_for(Duration::from_secs(20), || payloads_live(&node, "readings/good").len() >= 100).await, "{}", report(&node.status().await, "good"));
    let values: BTreeSet<u64> = payloads_live(&node, "readings/good").iter().map(|d| d["value"].as_f64().unwrap() as u64).collect();
    assert_eq!(values, (0..100).collect());

    // A wrong password never connects; status says why.
    let wrong = report(&node.status().await, "wrong");
    report!("mqtt tls: 100/100 readings over TLS with a password; wrong password: {wrong}");
    assert_eq!(wrong["connected"], false, "{wrong}");
    assert!(
        wrong["last_error"].as_str().unwrap_or("").to_lowercase().contains("refused")
            || wrong["last_error"].as_str().unwrap_or("").contains("NotAuthorized")
            || wrong["last_error"].as_str().unwrap_or("").contains("BadUserNamePassword"),
        "{wrong}"
    );
    node.shutdown().await;
}

/// The node `edge-1` in `dir` with the bridge `actors(port)`, whose broker is the test's own,
/// listening on that port.
async fn bridge_to_own_broker(dir: &Path, actors: impl FnOnce(u16) -> String) -> (Node, tokio::net::TcpListener) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let actors = actors(listener.local_addr().unwrap().port());
    let mut registry = strata_actors::registry();
    strata_bridges::register(&mut registry);
    let node = Node::start(NodeConfig::parse("edge-1.toml".as_ref(), &node_config(dir, &actors)).unwrap(), &registry).await.unwrap();
    (node, listener)
}

/// An MQTT bridge `plant` of readings `plant/p1/temp` into `readings/p1`, with `params`.
fn readings_bridge(port: u16, params: &str) -> String {
    format!(
        "[[actors]]\nkind = \"mqtt\"\nname = \"plant\"\noutputs = [\"readings/p1\"]\n[actors.params]\nhost = \"127.0.0.1\"\nport = {port}\n{params}\
         [[actors.params.readings]]\ntopic = \"plant/p1/temp\"\nstream = \"readings/p1\"\n"
    )
}

/// The bridge's connection, its CONNECT answered.
async fn connected(listener: &tokio::net::TcpListener) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let (mut sock, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept()).await.expect("the bridge connects").unwrap();
    assert_eq!(mqtt_packet(&mut sock).await.0 >> 4, 1, "CONNECT first");
    sock.write_all(&[0x20, 2, 0, 0]).await.unwrap();
    sock
}

/// Reads one MQTT packet: its first byte (type and flags) and its body.
async fn mqtt_packet(sock: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    mqtt_packet_or_closed(sock).await.expect("the bridge closed the connection")
}

/// One MQTT packet, or `None` if the connection closed (or failed).
async fn mqtt_packet_or_closed(sock: &mut tokio::net::TcpStream) -> Option<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let first = sock.read_u8().await.ok()?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = sock.read_u8().await.ok()?;
        len |= usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    sock.read_exact(&mut body).await.ok()?;
    Some((first, body))
}

/// A QoS 1 PUBLISH (MQTT 3.1.1, bodies under 128 bytes).
fn mqtt_publish(id: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(payload);
    assert!(body.len() < 128);
    let mut packet = vec![0x32, body.len() as u8];
    packet.extend(body);
    packet
}

/// A message the bridge refuses is acknowledged in arrival order, after the accepted ones
/// before it are durable (MQTT 3.1.1 4.6: PUBACKs in the order the PUBLISHes came). It used to
/// be acknowledged at once, ahead of them. The broker here is the test's own, speaking just
/// enough MQTT to see the order (Mosquitto does not tell).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_acknowledges_refused_messages_in_arrival_order() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (node, listener) = bridge_to_own_broker(dir.path(), |port| readings_bridge(port, "")).await;
    let mut sock = connected(&listener).await;
    let exchange = async {
        let (mut acks, mut published) = (Vec::new(), false);
        while acks.len() < 3 {
            let (first, body) = mqtt_packet(&mut sock).await;
            match first >> 4 {
                8 => {
                    sock.write_all(&[0x90, 3, body[0], body[1], 1]).await.unwrap();
                    if !published {
                        // Accepted, refused (not JSON), accepted: in one write, so the refusal
                        // comes while the first append is in flight.
                        let mut three = mqtt_publish(1, "plant/p1/temp", b"21.5");
                        three.extend(mqtt_publish(2, "plant/p1/temp", b"{not json"));
                        three.extend(mqtt_publish(3, "plant/p1/temp", b"22.5"));
                        sock.write_all(&three).await.unwrap();
                        published = true;
                    }
                }
                4 => acks.push(u16::from_be_bytes([body[0], body[1]])),
                12 => sock.write_all(&[0xd0, 0]).await.unwrap(),
                _ => {}
            }
        }
        acks
    };
    let acks = tokio::time::timeout(Duration::from_secs(30), exchange).await.expect("three acknowledgements");
    assert_eq!(acks, [1, 2, 3], "acknowledged in arrival order");
    assert_eq!(payloads_live(&node, "readings/p1").len(), 2, "the two readings are stored");
    node.shutdown().await;
}

/// A command in flight when the broker loses the session (restarted without persistence, or
/// the session expired) is sent again, and the commands behind it follow. The client drops
/// what is in flight when it finds the session new; the bridge used to wait for that
/// command's acknowledgement forever. The broker here is the test's own: it answers every
/// CONNECT with "no session", drops the connection at the first PUBLISH unanswered, and
/// acknowledges the next ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_sends_a_command_again_when_the_broker_lost_the_session() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (node, listener) = bridge_to_own_broker(dir.path(), |port| {
        format!(
            "[[actors]]\nkind = \"mqtt\"\nname = \"plant\"\ninputs = [\"commands\"]\n[actors.params]\nhost = \"127.0.0.1\"\nport = {port}\n\
             command_topic = \"plant/cmd/{{action}}\"\ncommand_expiry_ms = 600000\nreconnect_min_ms = 50\nreconnect_max_ms = 200\n"
        )
    })
    .await;
    for (key, action) in [("c-1", "stop"), ("c-2", "start")] {
        node.log().append_durable(StreamName::new("commands").unwrap(), command(key, action)).await.unwrap();
    }
    // Every PUBLISH's topic, and whether it was dropped or acknowledged.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let broker = {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let seen = seen.clone();
                // A connection the bridge closes (its actor restarting) ends its task.
                tokio::spawn(async move {
                    while let Some((first, body)) = mqtt_packet_or_closed(&mut sock).await {
                        let reply = match first >> 4 {
                            1 => vec![0x20, 2, 0, 0],
                            3 => {
                                let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                                let topic = String::from_utf8_lossy(&body[2..2 + topic_len]).into_owned();
                                let mut seen = seen.lock().unwrap();
                                if seen.is_empty() {
                                    seen.push(format!("{topic} dropped"));
                                    return;
                                }
                                seen.push(format!("{topic} acked"));
                                vec![0x40, 2, body[2 + topic_len], body[3 + topic_len]]
                            }
                            12 => vec![0xd0, 0],
                            _ => continue,
                        };
                        if sock.write_all(&reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        })
    };
    let sent = |doc: &Value| report(doc, "plant")["counters"]["commands_sent"] == 2;
    let done = wait_status(&node, Duration::from_secs(60), sent).await;
    assert!(done, "{} {:?}", node.status().await["reports"]["plant"], seen.lock().unwrap());
    assert_eq!(*seen.lock().unwrap(), ["plant/cmd/stop dropped", "plant/cmd/stop acked", "plant/cmd/start acked"]);
    broker.abort();
    node.shutdown().await;
}

/// Acknowledgements never overflow the client's queue, however many messages the broker has
/// in flight: each failed one used to take a place in the broker's window for good, and
/// ingest stopped once the window was full. The broker here sends 300 readings at once to a
/// bridge with two appends in flight, and counts the PUBACKs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_acknowledges_every_message_of_a_large_broker_window() {
    use tokio::io::AsyncWriteExt;
    const MESSAGES: u16 = 300;
    let dir = tempfile::tempdir().unwrap();
    let (node, listener) = bridge_to_own_broker(dir.path(), |port| readings_bridge(port, "in_flight_len_max = 2\n")).await;
    let mut sock = connected(&listener).await;
    let exchange = async {
        let mut acks = BTreeSet::new();
        while acks.len() < usize::from(MESSAGES) {
            let (first, body) = mqtt_packet(&mut sock).await;
            match first >> 4 {
                8 => {
                    sock.write_all(&[0x90, 3, body[0], body[1], 1]).await.unwrap();
                    let all: Vec<u8> = (1..=MESSAGES).flat_map(|id| mqtt_publish(id, "plant/p1/temp", id.to_string().as_bytes())).collect();
                    sock.write_all(&all).await.unwrap();
                }
                4 => {
                    acks.insert(u16::from_be_bytes([body[0], body[1]]));
                }
                12 => sock.write_all(&[0xd0, 0]).await.unwrap(),
                _ => {}
            }
        }
        acks
    };
    let acks = tokio::time::timeout(Duration::from_secs(60), exchange).await;
    let stored = payloads_live(&node, "readings/p1").len();
    assert!(acks.is_ok(), "not every message was acknowledged; {stored} stored");
    assert_eq!(stored, usize::from(MESSAGES));
    node.shutdown().await;
}
