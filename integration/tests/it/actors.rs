//! Issue #5, acceptance 2: an actor consuming 10,000 records from the durable log panics at
//! 20 random points; every record is handled at least once and no record's effects are
//! applied twice (checked by idempotency key on its outputs), and its snapshotted state
//! counts every record exactly once.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::Actor;
use rand::{Rng, SeedableRng};
use strata_core::actor::{snapshot_stream, ActorEnv};
use strata_core::config::{Name, RestartType, Strategy};
use strata_core::log::{Draft, Log, RocksStore, StoreOptions};
use strata_core::supervise::{self, policy::Policy, Supervisor, SupervisorArgs};
use strata_core::{ActorError, Behaviour, Ctx, Envelope, Kind, NodeConfig, NodeId, PayloadType, Registry, StreamName};
use strata_integration::probe::Recorder;

const RECORDS: u64 = 10_000;
const PANICS: usize = 20;

/// Panics (once each) at the seqs in `panic_at`; otherwise emits one output per input,
/// keyed by the input's id, and counts inputs in its state.
struct Effects {
    panic_at: Arc<Mutex<BTreeSet<u64>>>,
    handled: Arc<Mutex<HashMap<u64, u32>>>,
    out: StreamName,
}

impl Behaviour for Effects {
    type State = u64;

    async fn start(&self, ctx: &mut Ctx) -> Result<u64, ActorError> {
        Ok(ctx.snapshot().map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes"))))
    }

    async fn handle(&self, ctx: &mut Ctx, count: &mut u64, input: &Envelope) -> Result<(), ActorError> {
        let seq = input.id.seq.get();
        *self.handled.lock().unwrap().entry(seq).or_default() += 1;
        if self.panic_at.lock().unwrap().remove(&seq) {
            panic!("injected failure at seq {seq}");
        }
        *count += 1;
        ctx.save_snapshot(count.to_le_bytes().to_vec());
        let key = input.id.to_string();
        ctx.emit(&self.out, Draft::new(Kind::Command, PayloadType::new("test.effect/1")?, key.into_bytes()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_while_consuming_never_apply_an_effect_twice() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeId::new("edge-1").unwrap();
    let log = Log::new(Arc::new(RocksStore::open(dir.path(), &node, StoreOptions::default()).unwrap()));
    let input = StreamName::new("in").unwrap();
    let mut tickets = Vec::new();
    for i in 0..RECORDS {
        let draft = Draft::new(Kind::Reading, PayloadType::new("test/1").unwrap(), i.to_le_bytes().to_vec());
        tickets.push(log.append(input.clone(), draft).await.unwrap());
    }
    for t in tickets {
        t.await.unwrap();
    }

    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut points = BTreeSet::new();
    while points.len() < PANICS {
        points.insert(rng.gen_range(1..=RECORDS));
    }
    report!("seed {seed}: panics at seqs {points:?}");
    let panic_at = Arc::new(Mutex::new(points));
    let handled = Arc::new(Mutex::new(HashMap::new()));

    let config = NodeConfig::parse(
        "t.toml".as_ref(),
        "[node]\nid = \"edge-1\"\ntier = \"edge\"\n\n[[actors]]\nkind = \"effects\"\nname = \"fx\"\ninputs = [\"in\"]\noutputs = [\"out\"]\n",
    )
    .unwrap();
    let mut registry = Registry::new();
    let (p, h) = (panic_at.clone(), handled.clone());
    registry.register("effects", move |spec: &strata_core::config::ActorSpec| {
        Ok::<_, String>(Effects { panic_at: p.clone(), handled: h.clone(), out: spec.outputs[0].clone() })
    });
    let env = ActorEnv::fixed(Arc::new(config.clone()), strata_core::mode::Mode::Full, log.clone(), Arc::new(|_| {}));
    let child = registry.child(&config.actors[0], &env).unwrap();
    assert_eq!(child.restart, RestartType::Permanent);
    let rec = Recorder::default();
    let policy = Policy {
        strategy: Strategy::OneForOne,
        restarts_max: 100,
        window: Duration::from_secs(60),
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(1),
        jitter_pct: 0,
        child_shutdown_timeout: Duration::from_secs(5),
    };
    let args = SupervisorArgs { name: "root".into(), policy, children: vec![child], events: rec.sink() };
    let (sup, _) = Actor::spawn(None, Supervisor, args).await.unwrap();

    let consumer = Name::new("fx").unwrap();
    let key = log.local_key(&input);
    let t0 = Instant::now();
    while log.cursor(&consumer, &key) != Some(RECORDS) {
        assert!(t0.elapsed() < Duration::from_secs(120), "cursor stuck at {:?}", log.cursor(&consumer, &key));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    supervise::shutdown(&sup, Duration::from_secs(10)).await;

    assert!(panic_at.lock().unwrap().is_empty(), "every injected failure happened");
    let restarts = rec.events().iter().filter(|(_, e)| matches!(e, supervise::Event::ChildStarted { restarts, .. } if *restarts > 0)).count();
    assert_eq!(restarts, PANICS, "one restart per panic");

    let handled = handled.lock().unwrap();
    let unhandled = (1..=RECORDS).filter(|s| !handled.contains_key(s)).count();
    let rehandled: u32 = handled.values().map(|n| n - 1).sum();

    // Effects: the outputs, by idempotency key.
    let out_key = log.local_key(&StreamName::new("out").unwrap());
    let mut by_key: HashMap<Vec<u8>, u32> = HashMap::new();
    let mut from = 1;
    loop {
        let batch = log.read(&out_key, from, 1000).unwrap();
        let Some(last) = batch.last() else { break };
        from = last.id.seq.get() + 1;
        for e in &batch {
            *by_key.entry(e.payload.clone()).or_default() += 1;
        }
    }
    let twice = by_key.values().filter(|&&n| n > 1).count();
    let snapshot_key = log.local_key(&snapshot_stream(&consumer));
    let last = log.stream(&snapshot_key).unwrap().last;
    let state = u64::from_le_bytes(log.read(&snapshot_key, last, 1).unwrap()[0].payload.clone().try_into().unwrap());
    report!(
        "{RECORDS} records, {PANICS} panics, {restarts} restarts: unhandled {unhandled}, handled again after a crash {rehandled}, \
         effects {} (distinct keys {}), applied twice {twice}, state {state}, took {:?}",
        by_key.values().sum::<u32>(),
        by_key.len(),
        t0.elapsed()
    );
    assert_eq!(unhandled, 0, "every record handled at least once");
    assert!(rehandled > 0, "a panic in the middle of a batch makes the restarted actor handle its start again");
    assert_eq!(twice, 0, "no effect applied twice");
    assert_eq!(by_key.len() as u64, RECORDS, "one effect per record");
    assert_eq!(state, RECORDS, "the snapshotted state counts every record exactly once");
    log.close();
}

/// Records the seqs it handles, in order.
struct Order(Arc<Mutex<Vec<u64>>>);

impl Behaviour for Order {
    type State = ();

    async fn start(&self, _ctx: &mut Ctx) -> Result<(), ActorError> {
        Ok(())
    }

    async fn handle(&self, _ctx: &mut Ctx, _state: &mut (), input: &Envelope) -> Result<(), ActorError> {
        self.0.lock().unwrap().push(input.id.seq.get());
        Ok(())
    }
}

fn received(seq: u64) -> Envelope {
    strata_integration::reading_envelope("edge-7", 0xabc, "readings", seq)
}

/// `child` under a root supervisor that restarts it at most once.
async fn supervise_one(child: supervise::ChildSpec) -> ractor::ActorRef<supervise::SupervisorMsg> {
    let policy = Policy {
        strategy: Strategy::OneForOne,
        restarts_max: 1,
        window: Duration::from_secs(60),
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(1),
        jitter_pct: 0,
        child_shutdown_timeout: Duration::from_secs(5),
    };
    let args = SupervisorArgs { name: "root".into(), policy, children: vec![child], events: Recorder::default().sink() };
    Actor::spawn(None, Supervisor, args).await.unwrap().0
}

/// A cloud node's store holding edge-7's `readings` 1, 2, 4 and 5 (3 was lost live), and an
/// `Order` actor consuming that stream under a supervisor, with `replication` settings
/// `replication` (TOML lines). Returns what the actor handled and the events it recorded.
struct GapRun {
    log: Log,
    sup: ractor::ActorRef<supervise::SupervisorMsg>,
    seen: Arc<Mutex<Vec<u64>>>,
    events: Arc<Mutex<Vec<serde_json::Value>>>,
    _dir: tempfile::TempDir,
}

impl GapRun {
    async fn start(replication: &str) -> GapRun {
        let dir = tempfile::tempdir().unwrap();
        let log = GapRun::log(dir.path());
        for seq in [1, 2, 4, 5] {
            log.insert_remote(received(seq)).await.unwrap();
        }
        GapRun::with(dir, log, replication).await
    }

    fn log(dir: &std::path::Path) -> Log {
        Log::new(Arc::new(RocksStore::open(dir, &NodeId::new("cloud-1").unwrap(), StoreOptions::default()).unwrap()))
    }

    /// The actor, started on `log` (in `dir`).
    async fn with(dir: tempfile::TempDir, log: Log, replication: &str) -> GapRun {
        let config = NodeConfig::parse(
            "t.toml".as_ref(),
            &format!("[node]\nid = \"cloud-1\"\ntier = \"cloud\"\n[replication]\n{replication}\n[[actors]]\nkind = \"order\"\nname = \"ord\"\ninputs = [\"edge-7:readings\"]\n"),
        )
        .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let events = Arc::new(Mutex::new(Vec::new()));
        let mut registry = Registry::new();
        let s = seen.clone();
        registry.register("order", move |_: &strata_core::config::ActorSpec| Ok::<_, String>(Order(s.clone())));
        let mut env = ActorEnv::fixed(Arc::new(config.clone()), strata_core::mode::Mode::Full, log.clone(), Arc::new(|_| {}));
        let e = events.clone();
        env.events = Some(Arc::new(move |doc| e.lock().unwrap().push(doc)));
        let child = registry.child(&config.actors[0], &env).unwrap();
        let sup = supervise_one(child).await;
        GapRun { log, sup, seen, events, _dir: dir }
    }

    fn cursor(&self) -> Option<u64> {
        self.log.cursor(&Name::new("ord").unwrap(), &strata_core::log::StreamKey::of(&received(1).id))
    }

    async fn wait_for_cursor(&self, seq: u64) {
        let t0 = Instant::now();
        while self.cursor().is_none_or(|c| c < seq) {
            assert!(t0.elapsed() < Duration::from_secs(60), "cursor stuck at {:?}, waiting for {seq}", self.cursor());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop(self) -> (Vec<u64>, Vec<serde_json::Value>) {
        supervise::shutdown(&self.sup, Duration::from_secs(10)).await;
        self.log.close();
        let seen = self.seen.lock().unwrap().clone();
        let events = self.events.lock().unwrap().clone();
        (seen, events)
    }
}

/// An actor consuming a stream received from another node meets a gap (live delivery lost
/// seq 3; 4 and 5 arrived): it handles 1 and 2, waits, and handles 3, 4 and 5 once replay
/// has filled the gap. It used to handle 4 and 5 at once and commit its cursor past 3, which
/// it then never handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_consuming_a_received_stream_waits_at_a_gap() {
    let run = GapRun::start("").await;
    run.wait_for_cursor(2).await;
    run.log.insert_remote(received(3)).await.unwrap();
    run.wait_for_cursor(5).await;
    assert_eq!(run.cursor(), Some(5));
    let (seen, events) = run.stop().await;
    assert_eq!(seen, [1, 2, 3, 4, 5], "handled once each, in order");
    assert!(events.is_empty(), "{events:?}");
}

/// A gap no holder fills (the records were removed at their origin before this node got
/// them) must not stop the consumer for good: after `consumer_gap_wait_ms` it goes on after
/// the gap, and says which seqs it passed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_passes_over_a_gap_nobody_fills_and_records_it() {
    let run = GapRun::start("consumer_gap_wait_ms = 300").await;
    run.wait_for_cursor(5).await;
    let (seen, events) = run.stop().await;
    assert_eq!(seen, [1, 2, 4, 5]);
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(
        (e["event"].as_str(), e["actor"].as_str(), e["from"].as_u64(), e["to"].as_u64()),
        (Some("input_gap_passed"), Some("ord"), Some(3), Some(3)),
        "{e}"
    );
    assert!(e["stream"].as_str().is_some_and(|s| s.contains("edge-7") && s.contains("readings")), "{e}");
    assert!(e["waited_ms"].as_u64().is_some_and(|ms| ms >= 300), "it waited the configured time first: {e}");
}

/// A store of 300 records received from edge-7 in which seq 20's bytes do not decode and the
/// second data block of the table file fails RocksDB's checksum, consumed by the `Order`
/// actor with `settings` (TOML lines of `[replication]`, then any other section) until its
/// cursor reaches 300. Returns what it handled and its events.
async fn consume_damaged(settings: &str) -> (Vec<u64>, Vec<serde_json::Value>) {
    let dir = tempfile::tempdir().unwrap();
    let log = GapRun::log(dir.path());
    for seq in 1..=300 {
        log.insert_remote(received(seq)).await.unwrap();
    }
    log.close();
    drop(log);
    let table = {
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), dir.path(), ["log", "cursors", "watermarks", "meta"]).unwrap();
        let cf = db.cf_handle("log").unwrap();
        let keys: Vec<Box<[u8]>> = db.iterator_cf(cf, rocksdb::IteratorMode::Start).map(|r| r.unwrap().0).collect();
        assert_eq!(keys.len(), 300);
        db.put_cf(cf, &keys[19], [0xC1, 0xFF]).unwrap(); // seq 20: bytes that do not decode
        db.flush_cf(cf).unwrap();
        // The largest table file holds the 300 records (a smaller one, the damaged 20).
        let files = db.live_files().unwrap();
        let largest = files.iter().filter(|f| f.column_family_name == "log").max_by_key(|f| f.size).expect("a table file");
        dir.path().join(largest.name.trim_start_matches('/'))
    };
    // Damage the second data block (the first is about 4 KiB from offset 0).
    let mut bytes = std::fs::read(&table).unwrap();
    assert!(bytes.len() > 12_000, "several data blocks: {} bytes", bytes.len());
    for b in &mut bytes[5_000..5_032] {
        *b ^= 0x5a;
    }
    std::fs::write(&table, bytes).unwrap();

    let log = GapRun::log(dir.path());
    let run = GapRun::with(dir, log, settings).await;
    run.wait_for_cursor(300).await;
    run.stop().await
}

/// The events' (from, to, waited_ms), checked to be `input_damaged_passed` naming the error.
fn damaged_passes(events: &[serde_json::Value]) -> Vec<(u64, u64, u64)> {
    events
        .iter()
        .map(|e| {
            assert_eq!(e["event"], "input_damaged_passed", "{e}");
            assert!(e["error"].as_str().is_some_and(|x| x.contains("corrupted") || x.contains("block checksum mismatch")), "{e}");
            (e["from"].as_u64().unwrap(), e["to"].as_u64().unwrap(), e["waited_ms"].as_u64().unwrap())
        })
        .collect()
}

/// Records damaged on disk for good must not stop the consumer either: one whose bytes do not
/// decode, and a table block that fails RocksDB's checksum. The actor handles every record
/// around them, passes over those once the failure lasted `consumer_gap_wait_ms`, and says
/// which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_passes_over_records_that_cannot_be_read_and_records_it() {
    let (seen, events) = consume_damaged("consumer_gap_wait_ms = 300").await;
    let passed = damaged_passes(&events);
    assert_eq!(passed.len(), 2, "{events:#?}");
    assert_eq!((passed[0].0, passed[0].1), (20, 20), "{events:#?}");
    let (from, to, _) = passed[1];
    assert!(20 < from && from <= to && to < 300 && to - from < 150, "the damaged block's records: {from}..={to}");
    assert!(events[1]["error"].as_str().is_some_and(|e| e.contains("block checksum mismatch")), "{}", events[1]);
    assert!(passed.iter().all(|p| p.2 >= 300), "the failure lasted the configured wait first: {events:#?}");
    let expected: Vec<u64> = (1..=300).filter(|&s| s != 20 && !(from..=to).contains(&s)).collect();
    assert_eq!(seen, expected, "every other record handled once, in order");
    report!("damaged input: passed over seq 20 (undecodable) and {from}..={to} (table block failing its checksum); handled the other {}", seen.len());
}

/// A damaged block longer than one look (`input_batch_len_max` seqs): the actor waits once,
/// then passes it in steps, each right after the last, without waiting again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_passes_a_long_damaged_region_in_steps_after_one_wait() {
    let (seen, events) = consume_damaged("consumer_gap_wait_ms = 300\n[supervision]\ninput_batch_len_max = 4").await;
    let passed = damaged_passes(&events);
    assert_eq!((passed[0].0, passed[0].1), (20, 20), "{events:#?}");
    let steps = &passed[1..];
    assert!(steps.len() > 2, "the block took several looks: {events:#?}");
    assert!(steps.iter().all(|&(from, to, _)| to - from < 4), "at most 4 seqs per step: {events:#?}");
    assert!(steps.windows(2).all(|w| w[1].0 == w[0].1 + 1), "each step right after the last: {events:#?}");
    assert!(steps[0].2 >= 300, "one wait first: {events:#?}");
    assert!(steps[1..].iter().all(|s| s.2 == 0), "then no wait: {events:#?}");
    let (from, to) = (steps[0].0, steps[steps.len() - 1].1);
    let expected: Vec<u64> = (1..=300).filter(|&s| s != 20 && !(from..=to).contains(&s)).collect();
    assert_eq!(seen, expected, "every other record handled once, in order");
}

/// The arbiter acts only on fresh decisions and on this node's own resolutions: a decision
/// taken after its deadline (`route: "expired"`) or with a risk outside [0, 1] is escalated
/// whatever its action, a late one (`met: false`) unless mode safe's bounds allow it; one that
/// names no action is refused with an event, not taken for a harmless one; a resolution
/// replicated from another node is left to that node's arbiter; this node's own resolution and
/// a fresh decision within the bounds become commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_arbiter_escalates_stale_decisions_and_acts_only_on_its_own_resolutions() {
    use serde_json::{json, Value};
    let dir = tempfile::tempdir().unwrap();
    let node = NodeId::new("edge-1").unwrap();
    let log = Log::new(Arc::new(RocksStore::open(dir.path(), &node, StoreOptions::default()).unwrap()));
    let decisions = StreamName::new("decisions").unwrap();
    let decision = |doc: Value| Draft::new(Kind::Decision, PayloadType::new("strata.decision/1").unwrap(), doc.to_string().into_bytes());
    let resolution = |id: &str| json!({"escalation": id, "outcome": "approved", "action": "stop", "risk": 0.9});
    let fresh = log.append_durable(decisions.clone(), decision(json!({"action": "alert", "risk": 0.1, "route": "local"}))).await.unwrap();
    log.append_durable(decisions.clone(), decision(json!({"action": "alert", "risk": 0.1, "route": "expired"}))).await.unwrap();
    log.append_durable(decisions.clone(), decision(json!({"risk": 0.1, "route": "local"}))).await.unwrap();
    log.append_durable(decisions.clone(), decision(json!({"action": "stop", "risk": 0.1, "route": "fallback", "met": false}))).await.unwrap();
    let late_alert =
        log.append_durable(decisions.clone(), decision(json!({"action": "alert", "risk": 0.05, "route": "fallback", "met": false}))).await.unwrap();
    log.append_durable(decisions.clone(), decision(json!({"action": "alert", "risk": -1.0, "route": "local", "met": true}))).await.unwrap();
    let own = Draft::new(Kind::Decision, PayloadType::new("strata.resolution/1").unwrap(), resolution("own-escalation").to_string().into_bytes());
    log.append_durable(decisions.clone(), own).await.unwrap();
    let mut foreign = strata_integration::reading_envelope("fog-1", 0xf09, "decisions", 1);
    foreign.payload_type = PayloadType::new("strata.resolution/1").unwrap();
    foreign.payload = resolution("fog-escalation").to_string().into_bytes();
    log.insert_remote(foreign.clone()).await.unwrap();

    let config = NodeConfig::parse(
        "t.toml".as_ref(),
        "[node]\nid = \"edge-1\"\ntier = \"edge\"\n[[actors]]\nkind = \"arbiter\"\nname = \"arbiter\"\ninputs = [\"decisions\", \"fog-1:decisions\"]\noutputs = [\"commands\", \"escalations\"]\n",
    )
    .unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut env = ActorEnv::fixed(Arc::new(config.clone()), strata_core::mode::Mode::Full, log.clone(), Arc::new(|_| {}));
    let e = events.clone();
    env.events = Some(Arc::new(move |doc| e.lock().unwrap().push(doc)));
    let child = strata_actors::registry().child(&config.actors[0], &env).unwrap();
    let sup = supervise_one(child).await;
    let arbiter = Name::new("arbiter").unwrap();
    let (own_key, foreign_key) = (log.local_key(&decisions), strata_core::log::StreamKey::of(&foreign.id));
    let t0 = Instant::now();
    while log.cursor(&arbiter, &own_key) != Some(7) || log.cursor(&arbiter, &foreign_key) != Some(1) {
        assert!(t0.elapsed() < Duration::from_secs(60), "cursors stuck at {:?} / {:?}", log.cursor(&arbiter, &own_key), log.cursor(&arbiter, &foreign_key));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    supervise::shutdown(&sup, Duration::from_secs(10)).await;
    let read = |stream: &str| -> Vec<Value> {
        let key = log.local_key(&StreamName::new(stream).unwrap());
        log.read(&key, 1, 100).unwrap().iter().map(|e| serde_json::from_slice(&e.payload).unwrap()).collect()
    };
    let commands: Vec<String> = read("commands").iter().map(|c| c["key"].as_str().unwrap().to_owned()).collect();
    assert_eq!(
        commands,
        [fresh.id.to_string(), late_alert.id.to_string(), "own-escalation".to_owned()],
        "the fresh decision, the late one within mode safe's bounds and this node's resolution only"
    );
    let escalations = read("escalations");
    let reasons: Vec<&str> = escalations.iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(
        reasons,
        [
            "decided after its deadline (expired): not acted on autonomously",
            "decided after its deadline (missed), judged by the bounds of mode safe: action \"stop\" is not allowed autonomously in mode safe",
            "risk -1 is not within [0, 1]"
        ],
        "{escalations:?}"
    );
    let events = events.lock().unwrap().clone();
    assert!(events.iter().any(|e| e["event"] == "decision_refused" && e["reason"] == "it names no action"), "{events:?}");
}

/// Fails on every attempt at `fail_at` (an error) and `panic_at` (a panic), and with a
/// `Retry` (not the input's fault) at `retry_at` until `retries_left` runs out; at
/// `oversized_at` it emits an output over `log.payload_bytes_max`; otherwise it emits one
/// output keyed by the input's id. Counts its attempts per seq.
struct Poisoned {
    fail_at: u64,
    panic_at: u64,
    retry_at: u64,
    oversized_at: u64,
    retries_left: Arc<Mutex<u32>>,
    attempts: Arc<Mutex<HashMap<u64, u32>>>,
    out: StreamName,
}

impl Behaviour for Poisoned {
    type State = ();

    async fn start(&self, _ctx: &mut Ctx) -> Result<(), ActorError> {
        Ok(())
    }

    async fn handle(&self, ctx: &mut Ctx, _state: &mut (), input: &Envelope) -> Result<(), ActorError> {
        let seq = input.id.seq.get();
        *self.attempts.lock().unwrap().entry(seq).or_default() += 1;
        if seq == self.fail_at {
            return Err(format!("cannot parse reading {seq}").into());
        }
        if seq == self.panic_at {
            panic!("injected panic at reading {seq}");
        }
        if seq == self.oversized_at {
            let payload = vec![b'x'; ctx.log().payload_bytes_max() + 1];
            return ctx.emit(&self.out, Draft::new(Kind::Command, PayloadType::new("test.effect/1")?, payload));
        }
        if seq == self.retry_at {
            let mut left = self.retries_left.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                return Err(strata_core::actor::Retry("the device link is down".into()).into());
            }
        }
        ctx.emit(&self.out, Draft::new(Kind::Command, PayloadType::new("test.effect/1")?, input.id.to_string().into_bytes()))
    }
}

struct PoisonRun {
    log: Log,
    sup: ractor::ActorRef<supervise::SupervisorMsg>,
    rec: Recorder,
    attempts: Arc<Mutex<HashMap<u64, u32>>>,
    events: Arc<Mutex<Vec<serde_json::Value>>>,
    _dir: tempfile::TempDir,
}

impl PoisonRun {
    /// Six records in `in`, consumed by a `Poisoned` actor failing on 3 (an error) and 5 (a
    /// panic), and on 2 with `retries` `Retry` errors first, emitting an oversized output at
    /// `oversized_at` (0: none), under a root supervisor with the node's policy from
    /// `supervision` (TOML lines; the defaults otherwise).
    async fn start(supervision: &str, retries: u32, oversized_at: u64) -> PoisonRun {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::new(Arc::new(RocksStore::open(dir.path(), &NodeId::new("edge-1").unwrap(), StoreOptions::default()).unwrap()));
        for i in 1..=6u64 {
            log.append_durable(StreamName::new("in").unwrap(), Draft::new(Kind::Reading, PayloadType::new("test/1").unwrap(), i.to_le_bytes().to_vec()))
                .await
                .unwrap();
        }
        let config = NodeConfig::parse(
            "t.toml".as_ref(),
            &format!(
                "[node]\nid = \"edge-1\"\ntier = \"edge\"\n[supervision]\n{supervision}\n\
                 [[actors]]\nkind = \"poisoned\"\nname = \"p\"\ninputs = [\"in\"]\noutputs = [\"out\"]\n"
            ),
        )
        .unwrap();
        let attempts = Arc::new(Mutex::new(HashMap::new()));
        let retries_left = Arc::new(Mutex::new(retries));
        let mut registry = Registry::new();
        let a = attempts.clone();
        registry.register("poisoned", move |spec: &strata_core::config::ActorSpec| {
            Ok::<_, String>(Poisoned {
                fail_at: 3,
                panic_at: 5,
                retry_at: 2,
                oversized_at,
                retries_left: retries_left.clone(),
                attempts: a.clone(),
                out: spec.outputs[0].clone(),
            })
        });
        let events = Arc::new(Mutex::new(Vec::new()));
        let mut env = ActorEnv::fixed(Arc::new(config.clone()), strata_core::mode::Mode::Full, log.clone(), Arc::new(|_| {}));
        let e = events.clone();
        env.events = Some(Arc::new(move |doc| e.lock().unwrap().push(doc)));
        let child = registry.child(&config.actors[0], &env).unwrap();
        let rec = Recorder::default();
        let args = SupervisorArgs { name: "root".into(), policy: Policy::from_config(&config.supervision), children: vec![child], events: rec.sink() };
        let (sup, _) = Actor::spawn(None, Supervisor, args).await.unwrap();
        PoisonRun { log, sup, rec, attempts, events, _dir: dir }
    }

    /// Waits until the actor's cursor reached the last record; returns the seqs of the
    /// records whose effect was written, in order.
    async fn effects_once_through(&self) -> Vec<u64> {
        let (consumer, key) = (Name::new("p").unwrap(), self.log.local_key(&StreamName::new("in").unwrap()));
        let t0 = Instant::now();
        while self.log.cursor(&consumer, &key) != Some(6) {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "cursor stuck at {:?}; events {:?}; supervision {:?}",
                self.log.cursor(&consumer, &key),
                self.events.lock().unwrap(),
                self.rec.events()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        supervise::shutdown(&self.sup, Duration::from_secs(10)).await;
        let out = self.log.read(&self.log.local_key(&StreamName::new("out").unwrap()), 1, 100).unwrap();
        out.iter().map(|e| String::from_utf8(e.payload.clone()).unwrap().rsplit('#').next().unwrap().parse().unwrap()).collect()
    }

    fn restarts(&self) -> usize {
        self.rec.events().iter().filter(|(_, e)| matches!(e, supervise::Event::ChildStarted { restarts, .. } if *restarts > 0)).count()
    }

    /// The `input_failed_passed` events: (from, to, failures, error).
    fn passed(&self) -> Vec<(u64, u64, u64, String)> {
        let key = self.log.local_key(&StreamName::new("in").unwrap()).to_string();
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| {
                assert_eq!(
                    (e["event"].as_str(), e["actor"].as_str(), e["stream"].as_str()),
                    (Some("input_failed_passed"), Some("p"), Some(key.as_str())),
                    "{e}"
                );
                (e["from"].as_u64().unwrap(), e["to"].as_u64().unwrap(), e["failures"].as_u64().unwrap(), e["error"].as_str().unwrap().to_owned())
            })
            .collect()
    }
}

/// A record the handler fails on every time (a poison input) must not restart the actor
/// until its supervisor, and then the node, gives up: after `input_failures_max` failures in
/// a row on it (2, the default), the next instance passes it over and records which record,
/// how many failures and the last error. An error and a panic count alike; every other
/// record is handled, and its effect written once. With the default supervision (5 restarts
/// in 10 s), two such records are passed and the node goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_passes_over_an_input_its_handler_fails_on_every_time() {
    let run = PoisonRun::start("", 0, 0).await;
    let effects = run.effects_once_through().await;
    let attempts = run.attempts.lock().unwrap().clone();
    assert_eq!((attempts[&3], attempts[&5]), (2, 2), "each poison input tried input_failures_max times: {attempts:?}");
    assert_eq!(run.restarts(), 4, "one restart per failure");
    assert!(!run.rec.events().iter().any(|(_, e)| matches!(e, supervise::Event::Escalated { .. })), "the root did not give up");
    assert_eq!(run.passed(), [(3, 3, 2, "cannot parse reading 3".to_owned()), (5, 5, 2, "panicked: injected panic at reading 5".to_owned())]);
    assert_eq!(effects, [1, 2, 4, 6], "every other record's effect, once each");
    report!("poison inputs: 3 (an error) and 5 (a panic) passed over after 2 attempts each, 4 restarts under the default supervision; effects {effects:?}");
    run.log.close();
}

/// An output over `log.payload_bytes_max` is the handler's error (`Ctx::emit` refuses it), so
/// the input is passed over like any poison input. The log used to refuse the whole write
/// after the handler returned, outside the count of failures: the actor failed on it at
/// every restart until its supervisor, and then the node, gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_whose_output_is_over_the_payload_limit_is_passed_over() {
    let run = PoisonRun::start("restarts_max = 10\nrestart_window_ms = 60000", 0, 4).await;
    let effects = run.effects_once_through().await;
    assert_eq!(run.attempts.lock().unwrap()[&4], 2, "{:?}", run.attempts.lock().unwrap());
    let passed: Vec<(u64, String)> = run.passed().into_iter().map(|p| (p.0, p.3)).collect();
    assert_eq!(passed[1].0, 4, "{passed:?}");
    assert!(passed[1].1.contains("is over log.payload_bytes_max 1048576"), "{passed:?}");
    assert_eq!(effects, [1, 2, 6], "every other record's effect, once each");
    run.log.close();
}

/// A `Retry` error is not the input's fault: however many times it fails the actor, the
/// input is not passed over, and is handled once the fault is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_errors_do_not_count_towards_passing_an_input() {
    let run = PoisonRun::start("restarts_max = 10\nrestart_window_ms = 60000", 3, 0).await;
    let effects = run.effects_once_through().await;
    // 3 retries, then handled (and handled again when a later failure restarts its batch).
    assert!(run.attempts.lock().unwrap()[&2] >= 4, "{:?}", run.attempts.lock().unwrap());
    assert_eq!(effects, [1, 2, 4, 6], "2 handled after its retries");
    let passed: Vec<u64> = run.passed().iter().map(|p| p.0).collect();
    assert_eq!(passed, [3, 5], "only the poison inputs were passed");
    run.log.close();
}

/// `input_failures_max = 0` keeps the old behaviour for a node that must never skip an
/// input: the actor is restarted into the poison input until its supervisor gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_input_failures_max_0_a_poison_input_is_never_passed() {
    let run = PoisonRun::start(
        "restarts_max = 2
input_failures_max = 0",
        0,
        0,
    )
    .await;
    assert!(
        run.rec.wait_for(Duration::from_secs(60), |e| matches!(e, supervise::Event::Escalated { .. })).await,
        "the supervisor gave up: {:?}",
        run.rec.events()
    );
    let attempts = run.attempts.lock().unwrap().clone();
    assert_eq!(attempts[&3], 3, "tried at each of the 3 starts: {attempts:?}");
    assert!(!attempts.contains_key(&4), "never handled past it: {attempts:?}");
    assert!(run.events.lock().unwrap().is_empty(), "{:?}", run.events.lock().unwrap());
    run.log.close();
}

/// A CSV sensor played once (`repeat = false`) writes nothing more once its file has ended:
/// it used to write its snapshot again at every tick (a durable write every 10 ms at 100 Hz,
/// waking every idle actor with it), for as long as the node ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_sensor_played_once_writes_nothing_after_its_file_ends() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("line.csv");
    std::fs::write(&csv, "value\n1.5\n2.5\n3.5\n").unwrap();
    let log = Log::new(Arc::new(RocksStore::open(&dir.path().join("store"), &NodeId::new("edge-1").unwrap(), StoreOptions::default()).unwrap()));
    let config = NodeConfig::parse(
        "t.toml".as_ref(),
        &format!(
            "[node]\nid = \"edge-1\"\ntier = \"edge\"\n[[actors]]\nkind = \"sensor\"\nname = \"s\"\noutputs = [\"readings/s\"]\n\
             params = {{ rate_hz = 100, csv = {:?}, repeat = false }}\n",
            csv.display().to_string()
        ),
    )
    .unwrap();
    let env = ActorEnv::fixed(Arc::new(config.clone()), strata_core::mode::Mode::Full, log.clone(), Arc::new(|_| {}));
    let child = strata_actors::registry().child(&config.actors[0], &env).unwrap();
    let args = SupervisorArgs { name: "root".into(), policy: Policy::from_config(&config.supervision), children: vec![child], events: Arc::new(|_| {}) };
    let (sup, _) = Actor::spawn(None, Supervisor, args).await.unwrap();
    let count = |stream: &str| log.stream(&log.local_key(&StreamName::new(stream).unwrap())).map_or(0, |i| i.count);
    let snapshots = snapshot_stream(&Name::new("s").unwrap()).to_string();
    let t0 = Instant::now();
    while count("readings/s") < 3 {
        assert!(t0.elapsed() < Duration::from_secs(60), "{} readings", count("readings/s"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let written = count(&snapshots);
    // 50 ticks at 100 Hz: the file has ended, nothing is written.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!((count("readings/s"), count(&snapshots)), (3, written), "nothing after the file ended");
    supervise::shutdown(&sup, Duration::from_secs(10)).await;
    log.close();
}
