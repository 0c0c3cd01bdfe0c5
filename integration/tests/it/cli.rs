//! The `strata` binary, run as a user runs it.

use std::path::Path;
use std::process::{Command, Output};

use strata_integration::{repo_root, strata_bin};

fn strata(args: &[&str]) -> Output {
    Command::new(strata_bin()).args(args).current_dir(repo_root()).output().expect("run strata")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `strata check` on `files` and expects exit code `code` with `fragment` in stdout
/// (for 0) or stderr (otherwise).
fn check(files: &[&str], code: i32, fragment: &str) {
    let mut args = vec!["check"];
    args.extend_from_slice(files);
    let out = strata(&args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(code), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let shown = if code == 0 { &stdout } else { &stderr };
    assert!(shown.contains(fragment), "{fragment:?} not in:\n{shown}");
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn version() {
    let out = strata(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout).trim(), format!("strata {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn usage_error_exits_2() {
    assert_eq!(strata(&["check"]).status.code(), Some(2));
    assert_eq!(strata(&["frobnicate"]).status.code(), Some(2));
    // A mistyped endpoint is named, not tried.
    for args in [&["status", "--connect", "127.0.0.1:7448"][..], &["approve", "x", "--connect", "tcp/127.0.0.1"], &["deny", "x", "--connect", "udp/h:1"]] {
        let out = strata(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("is not a valid endpoint"), "{args:?}: {err}");
    }
    // A secured node's endpoint without the client's TLS files is named, not tried (it would
    // end as "cannot reach" after the timeout).
    for args in [&["status", "--connect", "quic/127.0.0.1:9"][..], &["approve", "x", "--connect", "quic/127.0.0.1:9"]] {
        let out = strata(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("quic/127.0.0.1:9 is a secured node's endpoint: --ca, --cert and --key are required"), "{args:?}: {err}");
    }
}

/// A client's TLS files are checked before any link is tried: the error names the flag and
/// the file (Zenoh itself would only say it cannot connect), and it is a usage error.
#[test]
fn client_tls_files_are_checked_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(strata(&["certs", "init", d.to_str().unwrap(), "--days", "30"]).status.success());
    assert!(strata(&["certs", "issue", d.to_str().unwrap(), "ops", "edge-1", "--days", "10"]).status.success());
    let path = |f: &str| d.join(f).to_str().unwrap().to_owned();
    let status =
        |cert: &str, key: &str| strata(&["status", "--connect", "quic/127.0.0.1:9", "--ca", &path("ca.pem"), "--cert", &path(cert), "--key", &path(key)]);
    let out = status("ops.pem", "edge-1.key");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--key") && err.contains("edge-1.key") && err.contains("is not the key of"), "{err}");
    let out = status("ops.pem", "missing.key");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--key") && err.contains("missing.key"), "{err}");
}

#[test]
fn example_continuum_checks() {
    check(&["configs/edge.toml", "configs/fog.toml", "configs/cloud.toml"], 0, "path edge -> fog -> cloud: edge-1 -> fog-1 -> cloud-1");
    check(&["configs/edge.toml"], 0, "config valid");
    check(&["configs/gateway.toml"], 0, "config valid");
}

#[test]
fn bad_bridge_sections_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = std::fs::read_to_string(repo_root().join("configs/gateway.toml")).unwrap();
    let cases = [
        ("protocol = \"3.1.1\"", "protocol = \"4\"", "actors[0].params: protocol: \"4\" is not \"3.1.1\" or \"5\""),
        (
            "topic = \"plant/+/temperature\"",
            "topic = \"plant/#/temperature\"",
            "actors[0].params: readings[0]: topic \"plant/#/temperature\" is not a valid MQTT filter",
        ),
        ("port = 1883", "port = 1883\nhots = \"x\"", "actors[0].params: unknown field `hots`"),
        ("port = 1883", "port = 99999", "actors[0].params: port: invalid value: integer `99999`, expected u16"),
        ("type = \"f32\"", "type = \"f64\"", "actors[1].params: points[0].type: unknown variant `f64`, expected one of `u16`, `i16`, `u32`, `i32`, `f32`"),
        ("value = 0 ", "value = 70000 ", "actors[1].params: writes[0]: value 70000 does not fit a U16"),
    ];
    for (i, (from, to, expected)) in cases.into_iter().enumerate() {
        assert!(gateway.contains(from), "{from}");
        let path = write(dir.path(), &format!("gw{i}.toml"), &gateway.replacen(from, to, 1));
        check(&[&path], 2, &format!("{path}: {expected}"));
    }
}

#[test]
fn bad_configs_exit_2_naming_file_key_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let edge = std::fs::read_to_string(repo_root().join("configs/edge.toml")).unwrap();
    let (fog, cloud) = ("configs/fog.toml", "configs/cloud.toml");

    let unknown = write(dir.path(), "unknown.toml", &edge.replace("lease_ms = 1000", "lease_ms = 1000\nleese = 3"));
    check(&[&unknown, fog, cloud], 2, &format!("{unknown}: zenoh.leese: unknown field `leese`"));

    let bad_stream = write(dir.path(), "stream.toml", &edge.replace("outputs = [\"decisions\"]", "outputs = [\"Readings!\"]"));
    check(&[&bad_stream], 2, &format!("{bad_stream}: actors[1].outputs[0]: \"Readings!\" is not a valid stream name"));

    let dup = write(dir.path(), "dup.toml", &std::fs::read_to_string(repo_root().join(cloud)).unwrap().replace("cloud-1", "fog-1").replace("7449", "7450"));
    check(&["configs/edge.toml", fog, cloud, &dup], 2, &format!("{dup}: node.id: \"fog-1\" is already the id of the node in configs/fog.toml"));

    let dangling = write(dir.path(), "dangling.toml", &edge.replace("tcp/127.0.0.1:7448", "tcp/127.0.0.1:7999"));
    check(&[&dangling, fog, cloud], 2, &format!("{dangling}: zenoh.connect[0]: \"tcp/127.0.0.1:7999\" is not the listen endpoint of any node given"));

    check(&["does/not/exist.toml"], 2, "does/not/exist.toml: cannot read the file");

    let kind = write(dir.path(), "kind.toml", &edge.replace("kind = \"sensor\"", "kind = \"sensr\""));
    check(&[&kind], 2, &format!("{kind}: actors[0].kind: unknown actor kind \"sensr\" (known: arbiter, chaos, inference, modbus, mqtt, sensor)"));
    let params = write(dir.path(), "params.toml", &edge.replace("rate_hz = 100", "rate_hz = -5"));
    check(&[&params], 2, &format!("{params}: actors[0].params: rate_hz: -5 is not in 0.001..=100000"));
    let model = write(dir.path(), "model.toml", &edge.replace("model = \"ewma\"", "model = \"gpt\""));
    check(&[&model], 2, &format!("{model}: actors[1].params: model: unknown model \"gpt\" (known: ewma, onnx)"));
    let unknown_param = write(dir.path(), "param.toml", &edge.replace("seed = 7", "sed = 7"));
    check(&[&unknown_param], 2, &format!("{unknown_param}: actors[0].params: unknown field `sed`"));
    // `strata run` refuses the same configs, before opening anything.
    let out = strata(&["run", &kind]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("unknown actor kind \"sensr\""), "{}", text(&out.stderr));

    // A `data_dir` no restart can fix is configuration too (exit 2, so that systemd's
    // `RestartPreventExitStatus=2` stops): another node's store (a config copied for a new
    // node, its `data_dir` left as it was), and a file.
    let other = dir.path().join("fog-store");
    strata_core::log::RocksStore::open(&other, &strata_core::NodeId::new("fog-1").unwrap(), strata_core::log::StoreOptions::default()).unwrap();
    let file = write(dir.path(), "not-a-dir", "x");
    for (data_dir, expected) in
        [(other.display().to_string(), "store belongs to node \"fog-1\", not \"edge-1\""), (file.clone(), "is a file, not a store directory")]
    {
        let config = write(dir.path(), "data.toml", &edge.replace("data_dir = \"data/edge-1\"", &format!("data_dir = {data_dir:?}")));
        let out = strata(&["run", &config]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(expected), "{}", text(&out.stderr));
    }
}

mod log {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use strata_core::log::{Draft, Log, RocksStore, StoreOptions};
    use strata_core::model::*;

    fn draft(text: &str) -> Draft {
        Draft::new(Kind::Reading, PayloadType::new("test/1").unwrap(), text.as_bytes().to_vec())
    }

    fn remote(seq: u64) -> Envelope {
        Envelope {
            id: EnvelopeId {
                origin: NodeId::new("edge-7").unwrap(),
                incarnation: Incarnation::from_raw(0xabc),
                stream: StreamName::new("readings/b").unwrap(),
                seq: Seq::new(seq).unwrap(),
            },
            kind: Kind::Reading,
            hlc: HlcTime::from_uhlc(uhlc::HLC::default().new_timestamp()),
            budget_us: Some(5000),
            priority: Priority::HIGH,
            trace: Trace::default(),
            payload_type: PayloadType::new("test/1").unwrap(),
            payload: vec![0xff, 0x00, seq as u8],
        }
    }

    /// A store of node `fog-1` with 3 local records and 2 of 3 remote ones (a gap at 2).
    async fn store(dir: &Path) -> Log {
        let log = Log::new(Arc::new(RocksStore::open(dir, &NodeId::new("fog-1").unwrap(), StoreOptions::default()).unwrap()));
        for i in 1..=3 {
            log.append_durable(StreamName::new("readings/a").unwrap(), draft(&format!("{{\"value\":{i}}}"))).await.unwrap();
        }
        for seq in [1, 3] {
            log.insert_remote(remote(seq)).await.unwrap();
        }
        log
    }

    #[tokio::test]
    async fn ls_and_tail_show_a_store_even_while_its_node_runs() {
        let dir = tempfile::tempdir().unwrap();
        let log = store(dir.path()).await;
        let path = dir.path().to_str().unwrap();

        let out = strata(&["log", "ls", path]);
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(stdout.contains("of node fog-1"), "{stdout}");
        let row = stdout.lines().find(|l| l.contains("readings/a")).expect("local stream listed");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cells[..6], &["fog-1", &format!("{}", log.incarnation()), "readings/a", "1", "3", "3"], "{row}");
        let row = stdout.lines().find(|l| l.contains("readings/b")).expect("replica listed");
        let cells: Vec<&str> = row.split_whitespace().collect();
        // origin incarnation stream first last count bytes(2 cells) watermark missing expired kind
        assert_eq!(&cells[..6], &["edge-7", "0000000000000abc", "readings/b", "1", "3", "2"], "{row}");
        assert_eq!(&cells[8..], &["1", "1", "0", "replica"], "{row}");

        let out = strata(&["log", "ls", path, "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let streams = json.as_array().unwrap();
        assert_eq!(streams.len(), 2);
        assert!(streams.iter().any(|s| s["stream"] == "readings/b" && s["watermark"] == 1 && s["missing"] == 1 && s["last"] == 3));

        let out = strata(&["log", "tail", path, "readings/a", "--from", "2"]);
        let lines: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("fog-1 #2 ") && lines[0].ends_with("{\"value\":2}"), "{}", lines[0]);

        let out = strata(&["log", "tail", path, "edge-7:readings/b", "--json"]);
        let rows: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(rows.iter().map(|r| r["seq"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(rows[1]["payload_hex"], "ff0003");
        assert_eq!(rows[1]["budget_us"], 5000);

        let out = strata(&["log", "tail", path, "readings/nope"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(text(&out.stderr).contains("no stream fog-1:readings/nope in"), "{}", text(&out.stderr));
        let out = strata(&["log", "tail", path, "edge-7:readings/b", "--incarnation", "abd"]);
        assert_eq!(out.status.code(), Some(2));
        let err = text(&out.stderr);
        assert!(
            err.contains("no stream edge-7:readings/b of incarnation 0000000000000abd in") && err.contains("edge-7:readings/b (incarnation 0000000000000abc)"),
            "{err}"
        );

        let out = strata(&["log", "tail", path, "readings/a", "--follow", "--poll-ms", "0"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(text(&out.stderr).contains("invalid value '0' for '--poll-ms <POLL_MS>'"), "{}", text(&out.stderr));

        // --follow prints what is appended after it started.
        let mut child = Command::new(strata_bin())
            .args(["log", "tail", path, "readings/a", "--follow", "--poll-ms", "50"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.push(line);
                if lines.len() == 5 {
                    break;
                }
            }
            lines
        });
        for i in 4..=5 {
            log.append_durable(StreamName::new("readings/a").unwrap(), draft(&format!("late {i}"))).await.unwrap();
        }
        let started = Instant::now();
        while !reader.is_finished() && started.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert!(lines[4].ends_with("late 5"), "{lines:?}");

        // Following a stream that is not there yet says so on stderr (a misspelt name does not
        // wait in silence), then prints its records once it appears.
        let mut child = Command::new(strata_bin())
            .args(["log", "tail", path, "readings/later", "--follow", "--poll-ms", "50"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let first_line = |pipe: Box<dyn std::io::Read + Send>| std::thread::spawn(move || BufReader::new(pipe).lines().map_while(Result::ok).next());
        let (note, printed) = (first_line(Box::new(stderr)), first_line(Box::new(stdout)));
        let started = Instant::now();
        while !note.is_finished() && started.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        log.append_durable(StreamName::new("readings/later").unwrap(), draft("at last")).await.unwrap();
        while !printed.is_finished() && started.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let note = note.join().unwrap().unwrap_or_default();
        assert!(note.contains("no stream fog-1:readings/later in") && note.contains("yet; waiting for it"), "{note}");
        let printed = printed.join().unwrap().unwrap_or_default();
        assert!(printed.starts_with("fog-1 #1 ") && printed.ends_with("at last"), "{printed}");
    }

    /// A damaged record (its bytes overwritten, as a bad block would) is not skipped: `tail`
    /// prints what comes before it, then names it and fails.
    #[tokio::test]
    async fn tail_stops_at_a_damaged_record_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = store(dir.path()).await;
        let incarnation = log.incarnation();
        log.close();
        drop(log);
        {
            let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), dir.path(), ["log", "cursors", "watermarks", "meta"]).unwrap();
            let cf = db.cf_handle("log").unwrap();
            // The node's own records are stored without their clock id (form byte 0xC1), the
            // replica's with it: the second own record is readings/a #2.
            let own: Vec<Box<[u8]>> =
                db.iterator_cf(cf, rocksdb::IteratorMode::Start).map(|r| r.unwrap()).filter(|(_, v)| v[0] == 0xC1).map(|(k, _)| k).collect();
            assert_eq!(own.len(), 3);
            db.put_cf(cf, &own[1], [0xC1, 0xFF]).unwrap();
        }
        let out = strata(&["log", "tail", dir.path().to_str().unwrap(), "readings/a"]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 1, "{stdout}");
        assert!(lines[0].starts_with("fog-1 #1 "), "{stdout}");
        assert!(stderr.contains(&format!("record fog-1/readings/a@{incarnation}#2 is corrupted")), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }

    /// A bad disk damages a table file's data block: RocksDB's block checksum finds it on
    /// read. `log tail` says which store, stream and where, and `log ls` still lists the store.
    #[tokio::test]
    async fn tail_names_a_damaged_table_block() {
        let dir = tempfile::tempdir().unwrap();
        let log = store(dir.path()).await;
        let incarnation = log.incarnation();
        for i in 4..=200 {
            log.append_durable(StreamName::new("readings/a").unwrap(), draft(&format!("{{\"value\":{i}}}"))).await.unwrap();
        }
        log.close();
        drop(log);
        // The table files that hold the records (column family `log`), not the store's meta.
        let tables: Vec<std::path::PathBuf> = {
            let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), dir.path(), ["log", "cursors", "watermarks", "meta"]).unwrap();
            db.flush_cf(db.cf_handle("log").unwrap()).unwrap();
            let files = db.live_files().unwrap();
            files.into_iter().filter(|f| f.column_family_name == "log").map(|f| dir.path().join(f.name.trim_start_matches('/'))).collect()
        };
        assert!(!tables.is_empty(), "the records are in a table file");
        // Each table file's first data block starts at offset 0; damage bytes inside it.
        for table in &tables {
            let mut bytes = std::fs::read(table).unwrap();
            for b in &mut bytes[64..96] {
                *b ^= 0x5a;
            }
            std::fs::write(table, bytes).unwrap();
        }
        let path = dir.path().to_str().unwrap();
        let out = strata(&["log", "tail", path, "readings/a"]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.starts_with(&format!("strata log tail: {path}: ")), "the store: {stderr}");
        assert!(stderr.contains("block checksum mismatch"), "what: {stderr}");
        let table = tables[0].file_name().unwrap().to_str().unwrap();
        assert!(stderr.contains(table), "the table file: {stderr}");
        // The damaged block is the first one: nothing before it to print.
        assert!(stderr.contains(&format!("(reading fog-1/readings/a@{incarnation} at #1)")), "where: {stderr}");
        assert!(text(&out.stdout).is_empty(), "{}", text(&out.stdout));
        assert!(!stderr.contains("panicked"), "{stderr}");
        // The listing reads the store's own tables, not the damaged one.
        let out = strata(&["log", "ls", path]);
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let row: Vec<&str> = stdout.lines().find(|l| l.contains("readings/a")).unwrap_or_default().split_whitespace().collect();
        assert_eq!(row.get(3..6), Some(&["1", "200", "200"][..]), "{stdout}");
    }

    #[tokio::test]
    async fn broken_stores_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        // A path that is no store: a usage error (2).
        let out = strata(&["log", "ls", dir.path().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2));
        assert!(text(&out.stderr).contains("no store here"), "{}", text(&out.stderr));

        let file = write(dir.path(), "file", "x");
        let out = strata(&["log", "ls", &file]);
        assert_eq!(out.status.code(), Some(2));
        assert!(text(&out.stderr).contains(&format!("{file}: is a file, not a store directory")), "{}", text(&out.stderr));

        let store_dir = dir.path().join("store");
        store(&store_dir).await.close();
        // Damage the manifest the way a bad disk would.
        let manifest = std::fs::read_dir(&store_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("MANIFEST-"))
            .unwrap();
        let len = std::fs::metadata(&manifest).unwrap().len();
        std::fs::write(&manifest, vec![0xa5; len as usize]).unwrap();
        let out = strata(&["log", "ls", store_dir.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&format!("{}: store is corrupted", store_dir.display())), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
