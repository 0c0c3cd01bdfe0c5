//! Behaviour of the log through its public handle, against both stores.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::codec::{self, Limits};
use crate::config::{RetentionRule, StreamPattern};
use crate::model::*;

fn node() -> NodeId {
    NodeId::new("edge-1").unwrap()
}

fn stream(s: &str) -> StreamName {
    StreamName::new(s).unwrap()
}

fn draft(payload: &[u8]) -> Draft {
    Draft::new(Kind::Reading, PayloadType::new("test/1").unwrap(), payload.to_vec())
}

fn rocks(dir: &Path, opts: StoreOptions) -> Log {
    Log::new(Arc::new(RocksStore::open(dir, &node(), opts).unwrap()))
}

/// Flushes the records of the closed store in `dir` to a table file, damages `len` bytes at
/// each of `offsets` in the largest one (the records' data blocks are about 4 KiB each, from
/// offset 0), so that RocksDB's block checksum fails there; returns the file.
pub(crate) fn damage_table_blocks(dir: &Path, offsets: &[usize]) -> std::path::PathBuf {
    let table = {
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), dir, ["log", "cursors", "watermarks", "meta"]).unwrap();
        db.flush_cf(db.cf_handle("log").unwrap()).unwrap();
        let files = db.live_files().unwrap();
        let largest = files.iter().filter(|f| f.column_family_name == "log").max_by_key(|f| f.size).expect("a table file");
        dir.join(largest.name.trim_start_matches('/'))
    };
    let mut bytes = std::fs::read(&table).unwrap();
    let end = offsets.iter().max().copied().unwrap_or(0) + 32;
    assert!(bytes.len() > end + 8_000, "data blocks past the damage: {} bytes", bytes.len());
    for &at in offsets {
        for b in &mut bytes[at..at + 32] {
            *b ^= 0x5a;
        }
    }
    std::fs::write(&table, bytes).unwrap();
    table
}

fn mem(retention: Vec<RetentionRule>) -> Log {
    Log::new(Arc::new(MemStore::new(node(), Incarnation::from_raw(7), Limits::default(), retention)))
}

/// Runs `test` against a fresh RocksDB store and a fresh in-memory store.
async fn both<F, Fut>(retention: Vec<RetentionRule>, test: F)
where
    F: Fn(Log) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions { retention: retention.clone(), ..StoreOptions::default() };
    test(rocks(dir.path(), opts)).await;
    test(mem(retention)).await;
}

fn remote(origin: &str, inc: u64, s: &str, seq: u64) -> Envelope {
    let hlc = uhlc::HLC::default();
    Envelope {
        id: EnvelopeId { origin: NodeId::new(origin).unwrap(), incarnation: Incarnation::from_raw(inc), stream: stream(s), seq: Seq::new(seq).unwrap() },
        kind: Kind::Reading,
        hlc: HlcTime::from_uhlc(hlc.new_timestamp()),
        budget_us: None,
        priority: Priority::NORMAL,
        trace: Trace::default(),
        payload_type: PayloadType::new("test/1").unwrap(),
        payload: seq.to_le_bytes().to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_get_every_seq_once_in_order() {
    both(vec![], |log| async move {
        let s = stream("readings/a");
        let tasks: Vec<_> = (0..8u8)
            .map(|p| {
                let (log, s) = (log.clone(), s.clone());
                tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for i in 0..50u8 {
                        let env = log.append_durable(s.clone(), draft(&[p, i])).await.unwrap();
                        seqs.push(env.id.seq.get());
                    }
                    seqs
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            let seqs = t.await.unwrap();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "one producer's seqs increase");
            all.extend(seqs);
        }
        all.sort();
        assert_eq!(all, (1..=400).collect::<Vec<u64>>());
        let key = log.local_key(&s);
        let records = log.read(&key, 1, 1000).unwrap();
        assert_eq!(records.iter().map(|e| e.id.seq.get()).collect::<Vec<_>>(), (1..=400).collect::<Vec<_>>());
        let hlcs: Vec<_> = records.iter().map(|e| e.hlc).collect();
        assert!(hlcs.windows(2).all(|w| w[0] < w[1]), "HLC order follows seq order");
        let info = log.stream(&key).unwrap();
        assert_eq!((info.first, info.last, info.count, info.watermark, info.local), (1, 400, 400, 400, true));
        // Bounded reads.
        assert_eq!(log.read(&key, 399, 10).unwrap().len(), 2);
        assert_eq!(log.read(&key, 401, 10).unwrap().len(), 0);
    })
    .await;
}

#[tokio::test]
async fn oversized_payload_is_refused_and_consumes_no_seq() {
    both(vec![], |log| async move {
        let s = stream("x");
        assert_eq!(log.append_durable(s.clone(), draft(b"a")).await.unwrap().id.seq.get(), 1);
        let err = log.append_durable(s.clone(), draft(&vec![0; 1024 * 1024 + 1])).await.unwrap_err();
        assert_eq!(err.to_string(), "payload of 1048577 bytes is larger than the limit of 1048576 bytes");
        assert_eq!(log.append_durable(s.clone(), draft(b"b")).await.unwrap().id.seq.get(), 2);
    })
    .await;
}

#[tokio::test]
async fn remote_inserts_are_idempotent_and_track_watermarks_and_gaps() {
    both(vec![], |log| async move {
        let key = StreamKey::of(&remote("fog-9", 3, "r", 1).id);
        for (seq, expected) in [
            (1, Inserted::Stored { watermark: 1 }),
            (1, Inserted::Duplicate { watermark: 1 }),
            (4, Inserted::Stored { watermark: 1 }),
            (6, Inserted::Stored { watermark: 1 }),
            (4, Inserted::Duplicate { watermark: 1 }),
            (2, Inserted::Stored { watermark: 2 }),
        ] {
            assert_eq!(log.insert_remote(remote("fog-9", 3, "r", seq)).await.unwrap(), expected, "seq {seq}");
        }
        assert_eq!(log.gaps(&key, 10), vec![3..=3, 5..=5]);
        assert_eq!(log.insert_remote(remote("fog-9", 3, "r", 3)).await.unwrap(), Inserted::Stored { watermark: 4 });
        let info = log.stream(&key).unwrap();
        assert_eq!((info.watermark, info.last, info.count, info.local, info.missing), (4, 6, 5, false, 1));
        // Another incarnation of the same origin is another history.
        assert_eq!(log.insert_remote(remote("fog-9", 4, "r", 1)).await.unwrap(), Inserted::Stored { watermark: 1 });
        assert_eq!(log.streams().len(), 2);
        // Our own records coming back are ignored.
        let own = log.append_durable(stream("mine"), draft(b"x")).await.unwrap();
        assert_eq!(log.insert_remote(own).await.unwrap(), Inserted::Own);
    })
    .await;
}

/// A reader tailing a stream when the store closes is told at once (it waited out its whole
/// wait, and then again and again, before).
#[tokio::test]
async fn a_tail_ends_with_closed_when_the_store_closes() {
    both(Vec::new(), |log| async move {
        log.append_durable(stream("s"), draft(b"1")).await.unwrap();
        let key = log.local_key(&stream("s"));
        let tail = tokio::spawn({
            let log = log.clone();
            async move { log.tail(&key, 2, 10, Duration::from_secs(600)).await }
        });
        // The tail reads, finds nothing and waits (a current-thread runtime: it runs here).
        tokio::task::yield_now().await;
        log.close();
        let ended = tokio::time::timeout(Duration::from_secs(60), tail).await.expect("the tail ends").unwrap();
        assert!(matches!(ended, Err(LogError::Closed)), "{ended:?}");
        // What is held stays readable; a tail with nothing more to read is told at once.
        assert_eq!(log.tail(&log.local_key(&stream("s")), 1, 10, Duration::MAX).await.unwrap().len(), 1);
        assert!(matches!(log.tail(&log.local_key(&stream("s")), 2, 10, Duration::MAX).await, Err(LogError::Closed)));
    })
    .await;
}

#[tokio::test]
async fn tail_waits_for_new_records() {
    both(vec![], |log| async move {
        let s = stream("t");
        let key = log.local_key(&s);
        assert!(log.tail(&key, 1, 10, Duration::from_millis(20)).await.unwrap().is_empty());
        let writer = {
            let (log, s) = (log.clone(), s.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                log.append_durable(s, draft(b"late")).await.unwrap();
            })
        };
        let got = log.tail(&key, 1, 10, Duration::from_secs(10)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].payload, b"late");
        writer.await.unwrap();
    })
    .await;
}

fn rule(streams: &str, bytes_max: Option<u64>, age_s_max: Option<u64>, acked: &[Tier]) -> RetentionRule {
    RetentionRule { streams: StreamPattern::new(streams).unwrap(), bytes_max, age_s_max, keep_until_acked: acked.to_vec() }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test]
async fn retention_by_bytes_counts_expired_for_registered_consumers() {
    both(vec![rule("readings/**", Some(1), None, &[])], |log| async move {
        let s = stream("readings/a");
        let key = log.local_key(&s);
        let reader = crate::config::Name::new("reader").unwrap();
        log.register_consumer(&reader, &key).await.unwrap();
        for i in 0..10u8 {
            log.append_durable(s.clone(), draft(&[i; 10])).await.unwrap();
        }
        log.commit_cursor(&reader, &key, 4).await.unwrap();
        let other = stream("other");
        log.append_durable(other.clone(), draft(b"kept")).await.unwrap();
        let report = log.sweep(now_ms()).await.unwrap();
        // bytes_max = 1 byte: the stream is over budget until every record is gone.
        let info = log.stream(&key).unwrap();
        assert_eq!(report.removed, 10, "{report:?}");
        assert_eq!(report.expired, 6, "seqs 5..=10 were not read yet");
        assert_eq!((info.count, info.bytes, info.first, info.expired, info.removed, info.watermark), (0, 0, 0, 6, 10, 10));
        assert_eq!(log.stream(&log.local_key(&other)).unwrap().count, 1, "no rule, no removal");
        // The seq continues after retention emptied the stream.
        assert_eq!(log.append_durable(s.clone(), draft(b"next")).await.unwrap().id.seq.get(), 11);
    })
    .await;
}

#[tokio::test]
async fn retention_keeps_what_the_named_tiers_have_not_acknowledged() {
    both(vec![rule("**", None, Some(0), &[Tier::Cloud])], |log| async move {
        let s = stream("r");
        let key = log.local_key(&s);
        for i in 0..5u8 {
            log.append_durable(s.clone(), draft(&[i])).await.unwrap();
        }
        let later = now_ms() + 10;
        assert_eq!(log.sweep(later).await.unwrap().removed, 0, "cloud acknowledged nothing yet");
        log.record_ack(Tier::Fog, &key, 5);
        assert_eq!(log.sweep(later).await.unwrap().removed, 0, "fog is not cloud");
        log.record_ack(Tier::Cloud, &key, 3);
        assert_eq!(log.sweep(later).await.unwrap().removed, 3);
        let info = log.stream(&key).unwrap();
        assert_eq!((info.first, info.count, info.expired), (4, 2, 0), "no consumer registered: nothing expired");
        assert_eq!(log.read(&key, 1, 10).unwrap().first().map(|e| e.id.seq.get()), Some(4));
    })
    .await;
}

/// `keep_until_acked` holds back this node's own records only: a replica's copy of another
/// node's stream (which no acknowledgement is ever recorded for) goes by size and age, or a
/// fog under the same rule as its edges would keep every replica for ever.
#[tokio::test]
async fn keep_until_acked_holds_back_own_records_not_replicas() {
    both(vec![rule("**", None, Some(0), &[Tier::Cloud])], |log| async move {
        let s = stream("r");
        for i in 0..3u8 {
            log.append_durable(s.clone(), draft(&[i])).await.unwrap();
        }
        for seq in 1..=3 {
            log.insert_remote(remote("edge-9", 1, "r", seq)).await.unwrap();
        }
        let replica = StreamKey { origin: NodeId::new("edge-9").unwrap(), incarnation: Incarnation::from_raw(1), stream: s.clone() };
        // Acknowledgements of a replica are not recorded by replication; one here changes nothing.
        log.record_ack(Tier::Fog, &replica, 1);
        let report = log.sweep(now_ms() + 10).await.unwrap();
        assert_eq!(report.removed, 3, "{report:?}");
        assert_eq!(log.stream(&replica).unwrap().count, 0, "the replica went by age");
        assert_eq!(log.stream(&log.local_key(&s)).unwrap().count, 3, "own records wait for the cloud");
    })
    .await;
}

#[tokio::test]
async fn reopen_keeps_seqs_cursors_incarnation_and_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let s = stream("r");
    let consumer = crate::config::Name::new("c").unwrap();
    let (inc, key) = {
        let log = rocks(dir.path(), StoreOptions::default());
        for _ in 0..3 {
            log.append_durable(s.clone(), draft(b"x")).await.unwrap();
        }
        let key = log.local_key(&s);
        log.commit_cursor(&consumer, &key, 2).await.unwrap();
        for seq in [1, 2, 5] {
            log.insert_remote(remote("fog-9", 1, "q", seq)).await.unwrap();
        }
        log.close();
        (log.incarnation(), key)
    };
    let log = rocks(dir.path(), StoreOptions::default());
    assert_eq!(log.incarnation(), inc);
    assert_eq!(log.cursor(&consumer, &key), Some(2));
    assert_eq!(log.append_durable(s.clone(), draft(b"y")).await.unwrap().id.seq.get(), 4);
    let rkey = StreamKey::of(&remote("fog-9", 1, "q", 1).id);
    assert_eq!(log.gaps(&rkey, 10), vec![3..=4]);
    assert_eq!(log.insert_remote(remote("fog-9", 1, "q", 5)).await.unwrap(), Inserted::Duplicate { watermark: 2 });
    assert_eq!(log.insert_remote(remote("fog-9", 1, "q", 3)).await.unwrap(), Inserted::Stored { watermark: 3 });
}

#[tokio::test]
async fn open_errors_are_distinct_and_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = RocksStore::open(&file, &node(), StoreOptions::default()).err().unwrap();
    assert_eq!(err, LogError::PathIsFile { path: file.clone() });
    assert!(err.to_string().contains("is a file, not a store directory"));

    let path = dir.path().join("store");
    let first = RocksStore::open(&path, &node(), StoreOptions::default()).unwrap();
    let err = RocksStore::open(&path, &node(), StoreOptions::default()).err().unwrap();
    assert_eq!(err, LogError::Locked { path: path.clone(), holder: format!("pid {}", std::process::id()) });
    // A reader may look while the writer runs.
    let reader = RocksStore::open_read_only(&path).unwrap();
    assert_eq!(reader.incarnation(), first.incarnation());
    drop(reader);
    drop(first);

    let err = RocksStore::open(&path, &NodeId::new("fog-1").unwrap(), StoreOptions::default()).err().unwrap();
    assert!(matches!(err, LogError::WrongNode { .. }), "{err}");

    // A store of a future format version.
    {
        let o = db_options_for_test();
        let db = rocksdb::DB::open_cf(&o, &path, ["log", "cursors", "watermarks", "meta"]).unwrap();
        db.put_cf(db.cf_handle("meta").unwrap(), b"format_version", 99u32.to_be_bytes()).unwrap();
    }
    let err = RocksStore::open(&path, &node(), StoreOptions::default()).err().unwrap();
    assert_eq!(err, LogError::IncompatibleFormat { path: path.clone(), found: 99, oldest: 1, newest: 2 });
    assert!(err.to_string().contains("format version 99; this build reads versions 1 to 2"), "{err}");

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_eq!(RocksStore::open_read_only(&empty).err().unwrap(), LogError::NotAStore { path: empty });
}

#[tokio::test]
async fn a_version_1_store_with_whole_envelopes_is_read_and_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let s = stream("r");
    let theirs = remote("fog-9", 1, "q", 1);
    let (key, ours) = {
        let log = rocks(dir.path(), StoreOptions::default());
        for payload in [b"1", b"2", b"3"] {
            log.append_durable(s.clone(), draft(payload)).await.unwrap();
        }
        log.insert_remote(theirs.clone()).await.unwrap();
        let key = log.local_key(&s);
        let ours = log.read(&key, 1, 10).unwrap();
        log.close();
        (key, ours)
    };
    let meta_format = |db: &rocksdb::DB| db.get_cf(db.cf_handle("meta").unwrap(), b"format_version").unwrap().unwrap();
    // What a version 1 build wrote: whole envelopes as values.
    {
        let db = rocksdb::DB::open_cf(&db_options_for_test(), dir.path(), ["log", "cursors", "watermarks", "meta"]).unwrap();
        let log_cf = db.cf_handle("log").unwrap();
        assert_eq!(db.get_cf(log_cf, keys::record_key(&key, 1)).unwrap().unwrap()[0], codec::RECORD_OWN_CLOCK);
        assert_eq!(db.get_cf(log_cf, keys::record_key(&StreamKey::of(&theirs.id), 1)).unwrap().unwrap()[0], codec::RECORD_CLOCK_ID);
        db.put_cf(log_cf, keys::record_key(&key, 2), codec::encode(&ours[1], &Limits::default()).unwrap()).unwrap();
        db.put_cf(db.cf_handle("meta").unwrap(), b"format_version", 1u32.to_be_bytes()).unwrap();
    }
    let reader = RocksStore::open_read_only(dir.path()).unwrap();
    assert_eq!(reader.read(&key, 1, 10).unwrap(), ours);
    drop(reader);
    {
        let log = rocks(dir.path(), StoreOptions::default());
        assert_eq!(log.read(&key, 1, 10).unwrap(), ours);
        assert_eq!(log.read(&StreamKey::of(&theirs.id), 1, 10).unwrap(), vec![theirs.clone()]);
        assert_eq!(log.append_durable(s.clone(), draft(b"4")).await.unwrap().id.seq.get(), 4);
        log.close();
    }
    let db = rocksdb::DB::open_cf(&db_options_for_test(), dir.path(), ["log", "cursors", "watermarks", "meta"]).unwrap();
    assert_eq!(meta_format(&db), 2u32.to_be_bytes());
    // A whole envelope stored under another record's key is corrupt, and says where.
    db.put_cf(db.cf_handle("log").unwrap(), keys::record_key(&key, 3), codec::encode(&ours[1], &Limits::default()).unwrap()).unwrap();
    drop(db);
    let log = rocks(dir.path(), StoreOptions::default());
    let err = log.read(&key, 3, 1).unwrap_err();
    assert!(matches!(&err, LogError::CorruptRecord { key, .. } if key.ends_with("#3")), "{err}");
    // A read across it returns what comes before it; one from it on returns its error.
    assert_eq!(log.read(&key, 1, 10).unwrap(), ours[..2]);
    assert!(matches!(log.read(&key, 3, 10), Err(LogError::CorruptRecord { .. })));
}

/// A record that cannot be decoded (a bad disk block, say) stops removal by age in its own
/// stream, where its age is unknown, and nowhere else; the sweep says which record it is.
#[tokio::test]
async fn an_unreadable_record_stops_retention_by_age_in_its_stream_only() {
    let dir = tempfile::tempdir().unwrap();
    let opts = || StoreOptions { retention: vec![rule("**", None, Some(0), &[])], ..StoreOptions::default() };
    let (a, b) = (stream("a"), stream("b"));
    let (key_a, key_b) = {
        let log = rocks(dir.path(), opts());
        for i in 0..3u8 {
            log.append_durable(a.clone(), draft(&[i])).await.unwrap();
            log.append_durable(b.clone(), draft(&[i])).await.unwrap();
        }
        log.close();
        (log.local_key(&a), log.local_key(&b))
    };
    {
        let db = rocksdb::DB::open_cf(&db_options_for_test(), dir.path(), ["log", "cursors", "watermarks", "meta"]).unwrap();
        db.put_cf(db.cf_handle("log").unwrap(), keys::record_key(&key_a, 2), [codec::RECORD_OWN_CLOCK, 0xFF]).unwrap();
    }
    let log = rocks(dir.path(), opts());
    let report = log.sweep(now_ms() + 10_000).await.unwrap();
    assert_eq!((report.removed, report.unreadable), (4, 1), "a#1 and all of b; {report:?}");
    let first = report.first_unreadable.unwrap();
    assert!(first.contains("a@") && first.contains("#2"), "{first}");
    assert_eq!(log.stream(&key_a).unwrap().first, 2);
    assert_eq!(log.read(&key_a, 3, 1).unwrap()[0].payload, vec![2], "what follows is kept");
    assert_eq!(log.stream(&key_b).unwrap().count, 0);
    // Byte-based removal needs no decoding: it goes past the unreadable record.
    drop(log);
    let log = rocks(dir.path(), StoreOptions { retention: vec![rule("a", Some(1), Some(0), &[])], ..StoreOptions::default() });
    let report = log.sweep(now_ms() + 10_000).await.unwrap();
    assert_eq!((report.removed, report.unreadable), (2, 0), "{report:?}");
}

fn db_options_for_test() -> rocksdb::Options {
    let mut o = rocksdb::Options::default();
    o.set_compression_type(rocksdb::DBCompressionType::None);
    o
}

#[tokio::test]
async fn read_only_reader_catches_up_with_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let log = rocks(dir.path(), StoreOptions::default());
    let s = stream("r");
    log.append_durable(s.clone(), draft(b"1")).await.unwrap();
    let reader = RocksStore::open_read_only(dir.path()).unwrap();
    let key = log.local_key(&s);
    assert_eq!(reader.stream(&key).unwrap().last, 1);
    log.append_durable(s.clone(), draft(b"2")).await.unwrap();
    reader.refresh().unwrap();
    assert_eq!(reader.stream(&key).unwrap().last, 2);
    assert_eq!(reader.read(&key, 1, 10).unwrap().len(), 2);
    assert!(matches!(Log::new(Arc::new(reader)).append_durable(s, draft(b"3")).await, Err(LogError::Closed)));
}

/// `log tail --follow` refreshes its reader every few hundred ms: a store nobody writes to is
/// not opened again (an open opens every table file), one written to since always is.
#[tokio::test]
async fn a_read_only_reader_opens_the_store_again_only_once_it_changed() {
    let dir = tempfile::tempdir().unwrap();
    let log = rocks(dir.path(), StoreOptions::default());
    let s = stream("r");
    let key = log.local_key(&s);
    log.append_durable(s.clone(), draft(b"1")).await.unwrap();
    let reader = RocksStore::open_read_only(dir.path()).unwrap();
    let now = std::time::SystemTime::now();
    // Written just before the listing taken at open: a write in the same clock tick would not
    // show in it, so the store is opened again.
    assert!(reader.refresh_at(now).unwrap(), "files written just now are opened again");
    // A minute on, the files are unchanged, but the listing they are compared with (taken at
    // `now`) was of files written just before it: opened again, and this listing, of files
    // left alone for a minute, is the one the next refreshes compare with.
    let later = now + Duration::from_secs(60);
    assert!(reader.refresh_at(later).unwrap(), "files quiet only since the listing are opened again");
    assert!(!reader.refresh_at(later + Duration::from_secs(60)).unwrap(), "nothing was written: no open");
    assert!(!reader.refresh_at(later + Duration::from_secs(120)).unwrap(), "still nothing written: no open");
    log.append_durable(s.clone(), draft(b"2")).await.unwrap();
    assert!(reader.refresh_at(later + Duration::from_secs(180)).unwrap(), "a record was appended: opened again");
    assert_eq!(reader.stream(&key).unwrap().last, 2);
    assert_eq!(reader.read(&key, 1, 10).unwrap().len(), 2);
    // A writer's store is never opened again.
    let writer = RocksStore::open(&dir.path().join("other"), &NodeId::new("n").unwrap(), StoreOptions::default()).unwrap();
    assert!(!writer.refresh().unwrap());
}

/// The same with real clocks, on a store whose WAL files are reused: a reused file keeps its
/// length, so the append after a quiet spell shows only in its modification time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_reader_sees_an_append_to_a_reused_wal_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = rocks(dir.path(), StoreOptions { memtable_bytes: 64 * 1024, ..StoreOptions::default() });
    let s = stream("readings/q");
    let key = log.local_key(&s);
    let mut tickets = std::collections::VecDeque::new();
    for _ in 0..3000 {
        tickets.push_back(log.append(s.clone(), draft(&[7; 200])).await.unwrap());
        if tickets.len() >= 64 {
            tickets.pop_front().unwrap().await.unwrap();
        }
    }
    for t in tickets {
        t.await.unwrap();
    }
    let wal_files = || -> Vec<(std::ffi::OsString, u64)> {
        let mut v: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .map(|e| (e.file_name(), e.metadata().unwrap().len()))
            .collect();
        v.sort();
        v
    };
    let reader = RocksStore::open_read_only(dir.path()).unwrap();
    // An append that fills the memtable moves the writer to another WAL file, which changes
    // the files' lengths, and so may a flush finishing meanwhile (more likely on a loaded
    // machine); an append with neither cannot. A few tries reach that case.
    for attempt in 1..=5u64 {
        // Bounded wait for the quiet spell after which a refresh no longer opens the store.
        let started = std::time::Instant::now();
        while reader.refresh().unwrap() {
            assert!(started.elapsed() < Duration::from_secs(30), "the reader kept opening a store nobody writes to");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(reader.stream(&key).unwrap().last, 2999 + attempt);
        let before = wal_files();
        log.append_durable(s.clone(), draft(b"late")).await.unwrap();
        assert!(reader.refresh().unwrap(), "append {attempt} after a quiet spell was noticed");
        assert_eq!(reader.stream(&key).unwrap().last, 3000 + attempt);
        assert_eq!(reader.read(&key, 3000 + attempt, 1).unwrap()[0].payload, b"late");
        if wal_files() == before {
            return;
        }
    }
    panic!("every append changed the WAL files' lengths: the case under test (a reused WAL file) was not reached");
}

/// With the smallest memtable the writer flushes and moves to a new WAL file every few
/// hundred KiB. A read-only reader catching up meanwhile sees an intact prefix of the stream
/// each time, never a later record past a missing one (which a follower would skip), and
/// everything once the writer is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_reader_never_skips_a_record_while_the_writer_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions { memtable_bytes: 64 * 1024, ..StoreOptions::default() };
    let s = stream("readings/w");
    let payload = |i: u64| {
        let mut p = i.to_le_bytes().to_vec();
        p.resize(200, (i % 251) as u8);
        p
    };
    let prefix = |records: &[Envelope]| {
        for (i, e) in records.iter().enumerate() {
            assert_eq!(e.id.seq.get(), i as u64 + 1, "a record is missing before seq {}", e.id.seq);
            assert!(e.payload == payload(i as u64 + 1), "record {} is not intact", i + 1);
        }
        records.len() as u64
    };
    let n = 6000u64;
    let log = rocks(dir.path(), opts);
    let key = log.local_key(&s);
    log.append_durable(s.clone(), draft(&payload(1))).await.unwrap();
    let reader = RocksStore::open_read_only(dir.path()).unwrap();
    let mut tickets = std::collections::VecDeque::new();
    for i in 2..=n {
        tickets.push_back(log.append(s.clone(), draft(&payload(i))).await.unwrap());
        if tickets.len() >= 64 {
            tickets.pop_front().unwrap().await.unwrap();
        }
        if i % 250 == 0 {
            reader.refresh().unwrap();
            prefix(&reader.read(&key, 1, n as usize).unwrap());
        }
    }
    for t in tickets {
        t.await.unwrap();
    }
    log.close();
    let sst_files = std::fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "sst")).count();
    assert!(sst_files >= 3, "{sst_files} memtable flushes: the test would prove nothing");
    let mut seen = 0;
    for _ in 0..50 {
        reader.refresh().unwrap();
        seen = prefix(&reader.read(&key, 1, n as usize).unwrap());
        if seen == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, n, "the reader caught up with everything written");
}

#[tokio::test]
async fn interval_and_never_policies_append_and_reopen() {
    for sync in [crate::config::SyncPolicy::Interval, crate::config::SyncPolicy::Never] {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions { sync, sync_interval_ms: 5, ..StoreOptions::default() };
        {
            let log = rocks(dir.path(), opts.clone());
            for _ in 0..10 {
                log.append_durable(stream("s"), draft(b"x")).await.unwrap();
            }
        }
        let log = rocks(dir.path(), opts);
        assert_eq!(log.streams()[0].last, 10, "{sync:?}");
    }
}

#[tokio::test]
async fn retention_always_keeps_the_latest_snapshot() {
    both(vec![rule("snapshots/**", Some(1), None, &[])], |log| async move {
        let s = stream("snapshots/fx");
        for i in 0..5u8 {
            log.append_durable(s.clone(), draft(&[i; 10])).await.unwrap();
        }
        let report = log.sweep(now_ms()).await.unwrap();
        let info = log.stream(&log.local_key(&s)).unwrap();
        assert_eq!(report.removed, 4, "{report:?}");
        assert_eq!((info.first, info.last, info.count), (5, 5, 1), "the latest snapshot stays though over bytes_max");
        assert_eq!(log.read(&log.local_key(&s), 5, 1).unwrap()[0].payload, [4u8; 10]);
    })
    .await;
}

/// Many appends in flight with at most one batch waiting for its sync: batches are written
/// while the previous one syncs, and still every seq is acknowledged once, in order, durable
/// across a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_commits_acknowledge_every_seq_in_order_and_keep_them() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions { commit_batch_len_max: 16, commit_unsynced_batches_max: 1, ..StoreOptions::default() };
    let s = stream("readings/p");
    let n = 3000u64;
    {
        let log = rocks(dir.path(), opts.clone());
        let key = log.local_key(&s);
        let mut tickets = std::collections::VecDeque::new();
        let mut acked = 0;
        for i in 0..n {
            tickets.push_back(log.append(s.clone(), draft(&i.to_le_bytes())).await.unwrap());
            if tickets.len() >= 256 {
                let env = tickets.pop_front().unwrap().await.unwrap();
                acked += 1;
                assert_eq!(env.id.seq.get(), acked, "acknowledged in seq order");
                if acked % 32 == 0 {
                    // What is acknowledged is readable, and a read never returns more than is
                    // durable (the durable state only grows, so checking after the read is
                    // enough; written but unsynced records are there to be found).
                    let read = log.read(&key, 1, 100_000).unwrap().len() as u64;
                    let durable = log.stream(&key).unwrap().last;
                    assert!(acked <= read && read <= durable, "acknowledged {acked}, read {read}, durable {durable}");
                }
            }
        }
        while let Some(t) = tickets.pop_front() {
            acked += 1;
            assert_eq!(t.await.unwrap().id.seq.get(), acked);
        }
        let commits = *log.store().commits().borrow();
        assert!(commits < n, "group commit: {commits} syncs for {n} appends");
        log.close();
    }
    let log = rocks(dir.path(), opts);
    let key = log.local_key(&s);
    let records = log.read(&key, 1, n as usize + 10).unwrap();
    assert_eq!(records.len() as u64, n);
    assert!(records.iter().enumerate().all(|(i, e)| e.id.seq.get() == i as u64 + 1 && e.payload == (i as u64).to_le_bytes()));
    assert_eq!(log.append_durable(s.clone(), draft(b"next")).await.unwrap().id.seq.get(), n + 1);
}

/// A backend with nothing stored, for the planner alone.
struct Empty;

impl super::core::Backend for Empty {
    fn scan(&self, _: &[u8], _: u64, _: u64, _: usize) -> Result<Vec<(u64, Vec<u8>)>, LogError> {
        Ok(Vec::new())
    }
}

/// The planner's overlay: a staged (written, not yet synced) batch is planned on top of,
/// but only applied batches are current, in order.
#[test]
fn staged_batches_are_planned_on_but_only_applied_ones_are_current() {
    use super::core::{Core, Write};
    let mut core = Core::new(node(), Incarnation::from_raw(7), Limits::default(), Vec::new());
    let s = stream("readings/o");
    let key = StreamKey { origin: node(), incarnation: Incarnation::from_raw(7), stream: s.clone() };
    let appends = |n: usize| (0..n).map(|_| Op::Append { stream: s.clone(), draft: draft(b"x") }).collect::<Vec<_>>();
    let seqs = |results: &[OpOutcome]| {
        results
            .iter()
            .map(|r| match r {
                Ok(OpResult::Appended(e)) => e.id.seq.get(),
                other => panic!("{other:?}"),
            })
            .collect::<Vec<_>>()
    };
    let mut sink: Vec<Write> = Vec::new();
    let a = core.plan(appends(3), &Empty, &mut sink);
    core.stage(&a, 1);
    let b = core.plan(appends(2), &Empty, &mut sink);
    core.stage(&b, 2);
    assert_eq!(core.readable_last(&key), 0, "nothing durable yet");
    assert!(core.info(&key).is_none());
    let ra = core.apply_staged(a, 1);
    assert_eq!(seqs(&ra), [1, 2, 3]);
    assert_eq!(core.readable_last(&key), 3, "the first batch is durable, the second is not");
    let c = core.plan(appends(1), &Empty, &mut sink);
    core.stage(&c, 3);
    assert_eq!(seqs(&core.apply_staged(b, 2)), [4, 5]);
    assert_eq!(core.readable_last(&key), 5);
    assert_eq!(seqs(&core.apply_staged(c, 3)), [6], "planned on top of both staged batches");
    assert_eq!(core.info(&key).map(|i| (i.last, i.count, i.watermark)), Some((6, 6, 6)));
}

/// The appends of one planned lot read the clock once and take the following logical ticks;
/// a received envelope's timestamp in the middle of the lot still comes before every local
/// append planned after it, and the next lot's timestamps come after this one's.
#[test]
fn appends_of_a_lot_get_increasing_timestamps_after_what_was_received() {
    use super::core::{Core, Write};
    let core = Core::new(node(), Incarnation::from_raw(7), Limits::default(), Vec::new());
    let s = stream("readings/h");
    let append = || Op::Append { stream: s.clone(), draft: draft(b"x") };
    // A remote clock 100 ms ahead: within the HLC's accepted drift, so it moves ours.
    let mut ahead = remote("fog-1", 3, "readings/r", 1);
    let t = ahead.hlc.as_uhlc();
    let later = uhlc::NTP64(t.get_time().0 + uhlc::NTP64::from(Duration::from_millis(100)).0);
    ahead.hlc = HlcTime::from_uhlc(uhlc::Timestamp::new(later, *t.get_id()));
    let mut ops: Vec<Op> = (0..50).map(|_| append()).collect();
    ops.push(Op::Insert { envelope: ahead.clone() });
    ops.extend((0..50).map(|_| append()));
    let stamps = |results: &[OpOutcome]| -> Vec<HlcTime> {
        results
            .iter()
            .filter_map(|r| match r {
                Ok(OpResult::Appended(e)) => Some(e.hlc),
                Ok(OpResult::Inserted(Inserted::Stored { .. })) => None,
                other => panic!("{other:?}"),
            })
            .collect()
    };
    let mut sink: Vec<Write> = Vec::new();
    let first = stamps(&core.plan(ops, &Empty, &mut sink).results);
    assert_eq!(first.len(), 100);
    assert!(first.windows(2).all(|w| w[0] < w[1]), "increasing in plan order");
    assert!(first[49] < ahead.hlc, "planned before the insert: the local clock");
    assert!(first[50] > ahead.hlc, "planned after the insert: after what was received");
    let second = stamps(&core.plan((0..3).map(|_| append()).collect(), &Empty, &mut sink).results);
    assert!(second[0] > first[99], "the next lot comes after the last of this one");
}

#[tokio::test]
async fn a_consumer_reads_a_received_stream_in_order_up_to_the_next_gap() {
    both(vec![rule("**", None, Some(0), &[])], |log| async move {
        let key = StreamKey::of(&remote("fog-9", 3, "r", 1).id);
        for seq in [1, 2, 4, 5, 8] {
            log.insert_remote(remote("fog-9", 3, "r", seq)).await.unwrap();
        }
        let seqs = |records: Vec<Envelope>| records.iter().map(|e| e.id.seq.get()).collect::<Vec<_>>();
        assert_eq!(seqs(log.read(&key, 1, 10).unwrap()), [1, 2, 4, 5, 8], "a plain read returns what is held");
        assert_eq!(seqs(log.read_in_order(&key, 1, 10).unwrap()), [1, 2], "a consumer stops at the gap");
        assert!(log.read_in_order(&key, 3, 10).unwrap().is_empty());
        log.insert_remote(remote("fog-9", 3, "r", 3)).await.unwrap();
        assert_eq!(seqs(log.read_in_order(&key, 3, 10).unwrap()), [3, 4, 5], "the filled gap, then up to the watermark");
        // Retention removes up to the watermark; the stream then starts at the next record
        // held, past the gap, and a consumer behind it still reads nothing beyond the watermark.
        let report = log.sweep(now_ms() + 10_000).await.unwrap();
        assert_eq!(report.removed, 5, "{report:?}");
        let info = log.stream(&key).unwrap();
        assert_eq!((info.first, info.watermark, info.count), (8, 5, 1));
        assert!(log.read_in_order(&key, 1, 10).unwrap().is_empty(), "nothing held before the gap");
        assert_eq!(log.next_gap(&key, 1), Some(6..=7), "so a consumer at 1 waits at 6..=7");
        assert_eq!(seqs(log.read_in_order(&key, 8, 10).unwrap()), [8], "past the gap (a consumer that passed over it)");
        assert_eq!(log.next_gap(&key, 8), None);
    })
    .await;
}

#[tokio::test]
async fn a_received_seq_above_the_highest_a_stream_may_hold_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = rocks(dir.path(), StoreOptions::default());
    let err = log.insert_remote(remote("fog-9", 3, "r", u64::MAX)).await.unwrap_err();
    assert!(matches!(err, LogError::SeqOutOfRange { .. }), "{err:?}");
    assert!(err.to_string().contains("fog-9") && err.to_string().contains(&SEQ_MAX.to_string()), "{err}");
    assert_eq!(log.insert_remote(remote("fog-9", 3, "r", SEQ_MAX)).await.unwrap(), Inserted::Stored { watermark: 0 });
    log.close();
    drop(log);
    // A store written before seqs were bounded may hold one at u64::MAX: it still opens (its
    // state is rebuilt by scanning above the watermark, which used to start again at 0).
    let key = StreamKey::of(&remote("fog-9", 3, "r", 1).id);
    {
        let db = rocksdb::DB::open_cf(&db_options_for_test(), dir.path(), ["log", "cursors", "watermarks", "meta"]).unwrap();
        let mut value = Vec::new();
        codec::encode_record_into(&remote("fog-9", 3, "r", u64::MAX), &Limits::default(), &mut value).unwrap();
        db.put_cf(db.cf_handle("log").unwrap(), keys::record_key(&key, u64::MAX), value).unwrap();
    }
    let path = dir.path().to_owned();
    let reopened = tokio::task::spawn_blocking(move || RocksStore::open(&path, &node(), StoreOptions::default()));
    let store = tokio::time::timeout(Duration::from_secs(60), reopened).await.expect("the store opens").unwrap().unwrap();
    let info = store.stream(&key).unwrap();
    assert_eq!((info.watermark, info.last, info.count), (0, u64::MAX, 1));
    assert_eq!(store.gaps(&key, 10), vec![1..=SEQ_MAX - 1]);
}

#[tokio::test]
async fn a_panicking_committer_refuses_what_is_queued_and_what_comes_next() {
    let dir = tempfile::tempdir().unwrap();
    let log = rocks(dir.path(), StoreOptions::default());
    log.append_durable(stream("a"), draft(b"before")).await.unwrap();
    // Only appends and cursor commits may be atomic: anything else is a bug in the caller,
    // and the committer panics on it. That is the way into the panic path here.
    crash_committer(&log).await;
    let next = tokio::time::timeout(Duration::from_secs(30), async { log.append(stream("a"), draft(b"after")).await?.await })
        .await
        .expect("an append after the panic is answered");
    let err = next.unwrap_err();
    assert!(matches!(err, LogError::Closed | LogError::Io { .. }), "{err:?}");
    drop(log);
    // Reopened, the store has what was durable before.
    let log = rocks(dir.path(), StoreOptions::default());
    let key = log.local_key(&stream("a"));
    assert_eq!(log.read(&key, 1, 10).unwrap().iter().map(|e| e.payload.clone()).collect::<Vec<_>>(), [b"before".to_vec()]);
}

/// The store of `node` in `dir` under `sync = interval`, opened as in boot `boot` of the
/// machine (a new boot id acts out a restart of the machine since the last open).
pub(crate) fn open_in_boot(dir: &Path, node: &NodeId, boot: &str) -> Log {
    let opts = StoreOptions { sync: crate::config::SyncPolicy::Interval, sync_interval_ms: 5, boot_id: Some(boot.into()), ..StoreOptions::default() };
    Log::new(Arc::new(RocksStore::open(dir, node, opts).unwrap()))
}

/// Makes the committer of `log` panic (the way in that a crash takes): the store is not
/// marked closed cleanly.
pub(crate) async fn crash_committer(log: &Log) {
    let bad = Op::Atomic { ops: vec![Op::Sweep { now_unix_ms: 0 }] };
    let ticket = log.store().submit(bad).await.unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(30), ticket).await.expect("answered");
    assert!(answered.is_err());
}

/// Under `sync = interval` or `never`, a store left open when the machine restarted (a power
/// loss) may have lost records it acknowledged (and perhaps sent on): it goes on under a new
/// incarnation, so those seqs are never handed out again, and what it held stays readable
/// under the old one. After a crash of the process alone (same boot), closed cleanly, or under
/// `sync = always`, it keeps its incarnation.
#[tokio::test]
async fn a_store_left_open_across_a_restart_without_sync_always_moves_to_a_new_incarnation() {
    use crate::config::SyncPolicy;
    for sync in [SyncPolicy::Interval, SyncPolicy::Never, SyncPolicy::Always] {
        let dir = tempfile::tempdir().unwrap();
        // Records of "a" go by age at once, once the cloud holds them.
        let retention = vec![rule("a", None, Some(0), &[Tier::Cloud])];
        let boot = |id: &str| StoreOptions { sync, sync_interval_ms: 5, boot_id: Some(id.into()), retention: retention.clone(), ..StoreOptions::default() };
        let log = rocks(dir.path(), boot("boot-1"));
        let first = log.incarnation();
        for p in [b"a1", b"a2", b"a3"] {
            log.append_durable(stream("a"), draft(p)).await.unwrap();
        }
        log.append_durable(stream("only-before"), draft(b"b1")).await.unwrap();
        crash_committer(&log).await;
        drop(log);
        // The process crashed, the machine did not restart: nothing acknowledged was lost.
        let log = rocks(dir.path(), boot("boot-1"));
        assert_eq!(log.incarnation(), first, "{sync:?}");
        crash_committer(&log).await;
        drop(log);

        let opts = boot("boot-2");
        let log = rocks(dir.path(), opts.clone());
        if sync == SyncPolicy::Always {
            assert_eq!(log.incarnation(), first, "nothing acknowledged can be lost under sync = always");
            assert_eq!(log.own_keys(&stream("a")), [log.local_key(&stream("a"))]);
            assert_eq!(log.append_durable(stream("a"), draft(b"a4")).await.unwrap().id.seq.get(), 4);
            continue;
        }
        let second = log.incarnation();
        assert_ne!(second, first, "{sync:?}");
        assert_eq!(log.store().earlier_incarnations(), [first]);
        let old = StreamKey { origin: node(), incarnation: first, stream: stream("a") };
        assert_eq!(log.own_keys(&stream("a")), [old.clone(), log.local_key(&stream("a"))]);
        let held: Vec<Vec<u8>> = log.read(&old, 1, 10).unwrap().into_iter().map(|e| e.payload).collect();
        assert_eq!(held, [b"a1".to_vec(), b"a2".to_vec(), b"a3".to_vec()], "what survived stays under the old key");
        // A copy of this node's own records from elsewhere adds nothing.
        let mut copy = log.read(&old, 1, 1).unwrap().remove(0);
        copy.id.seq = Seq::new(4).unwrap();
        assert_eq!(log.insert_remote(copy).await.unwrap(), Inserted::Own);
        let info = log.stream(&old).unwrap();
        assert!(!info.local && info.own && info.watermark == 3, "{info:?}");
        assert!(log.durable_by(&old, 3).is_some_and(|t| t <= std::time::Instant::now()), "durable before this open");
        // Still this node's records: kept until the cloud holds them.
        assert_eq!(log.sweep(now_ms() + 10).await.unwrap().removed, 0);
        log.record_ack(Tier::Cloud, &old, 1);
        assert_eq!(log.sweep(now_ms() + 10).await.unwrap().removed, 1);
        let next = log.append_durable(stream("a"), draft(b"new")).await.unwrap();
        assert_eq!((next.id.incarnation, next.id.seq.get()), (second, 1), "the new incarnation starts at seq 1");
        assert_eq!(log.latest_own(&stream("a")).unwrap().unwrap().payload, b"new", "the newest incarnation's last record");
        assert_eq!(log.latest_own(&stream("only-before")).unwrap().unwrap().payload, b"b1", "or an earlier one's");
        assert!(log.latest_own(&stream("never")).unwrap().is_none());
        log.close();
        drop(log);

        // Closed cleanly: the same incarnation, after a restart too; the history stays.
        let log = rocks(dir.path(), boot("boot-2b"));
        assert_eq!(log.incarnation(), second);
        assert_eq!(log.append_durable(stream("a"), draft(b"new2")).await.unwrap().id.seq.get(), 2);
        // A second restart adds to the history, oldest first.
        crash_committer(&log).await;
        drop(log);
        let log = rocks(dir.path(), boot("boot-3"));
        assert_eq!(log.store().earlier_incarnations(), [first, second]);
        assert_eq!(log.own_keys(&stream("a")).len(), 3);
        // A reader sees the same history.
        log.close();
        drop(log);
        let reader = RocksStore::open_read_only(dir.path()).unwrap();
        assert_eq!(reader.earlier_incarnations(), [first, second]);
    }
}

/// The marker's corner cases: a run under `always` after an unsynced run of the same boot
/// crashed does not vouch for that run's writes until it is closed cleanly; a marker value
/// this build does not know (a later build's) is taken as a possible loss; a store from
/// before the marker was kept is not moved.
#[tokio::test]
async fn the_open_marker_errs_on_the_side_of_a_new_incarnation() {
    use crate::config::SyncPolicy;
    let opts = |sync, boot: &str| StoreOptions { sync, boot_id: Some(boot.into()), ..StoreOptions::default() };
    let set_marker = |dir: &Path, value: Option<&[u8]>| {
        let db = rocksdb::DB::open_cf(&db_options_for_test(), dir, ["log", "cursors", "watermarks", "meta"]).unwrap();
        let meta = db.cf_handle("meta").unwrap();
        match value {
            Some(v) => db.put_cf(meta, b"open", v).unwrap(),
            None => db.delete_cf(meta, b"open").unwrap(),
        }
    };

    let dir = tempfile::tempdir().unwrap();
    let log = rocks(dir.path(), opts(SyncPolicy::Interval, "boot-1"));
    let first = log.incarnation();
    log.append_durable(stream("a"), draft(b"1")).await.unwrap();
    crash_committer(&log).await;
    drop(log);
    let log = rocks(dir.path(), opts(SyncPolicy::Always, "boot-1"));
    assert_eq!(log.incarnation(), first, "same boot: nothing was lost");
    crash_committer(&log).await;
    drop(log);
    let log = rocks(dir.path(), opts(SyncPolicy::Always, "boot-2"));
    assert_ne!(log.incarnation(), first, "the unsynced run's writes were not vouched for by the crashed `always` run");
    let second = log.incarnation();
    log.close();
    drop(log);

    set_marker(dir.path(), Some(&[9]));
    let log = rocks(dir.path(), opts(SyncPolicy::Always, "boot-2"));
    assert_ne!(log.incarnation(), second, "an unknown marker value");
    let third = log.incarnation();
    assert_eq!(log.store().earlier_incarnations(), [first, second]);
    log.close();
    drop(log);
    assert!(RocksStore::open_read_only(dir.path()).is_ok());

    set_marker(dir.path(), None);
    let log = rocks(dir.path(), opts(SyncPolicy::Interval, "boot-3"));
    assert_eq!(log.incarnation(), third, "no marker (an older build's store): not moved");
}

/// A failed periodic WAL sync (`sync = interval`) may lose what it held even in the same boot
/// (the kernel may drop the pages it failed to write): the next open goes on under a new
/// incarnation, though the store was then closed cleanly and reopened in the same boot. The
/// failure used to only keep the store from being marked closed, which a reopen in the same
/// boot took for a crash of the process alone.
#[tokio::test]
async fn after_a_failed_periodic_sync_the_next_open_moves_to_a_new_incarnation() {
    let dir = tempfile::tempdir().unwrap();
    let opts = || StoreOptions { sync: crate::config::SyncPolicy::Interval, sync_interval_ms: 5, boot_id: Some("boot-1".into()), ..StoreOptions::default() };
    let store = Arc::new(RocksStore::open(dir.path(), &node(), opts()).unwrap());
    let log = Log::new(store.clone());
    let first = log.incarnation();
    log.append_durable(stream("a"), draft(b"1")).await.unwrap();
    store.fail_a_periodic_sync();
    log.append_durable(stream("a"), draft(b"2")).await.unwrap();
    log.close();
    drop((log, store));
    let log = rocks(dir.path(), opts());
    assert_ne!(log.incarnation(), first, "same boot, but a sync failed");
    assert_eq!(log.store().earlier_incarnations(), [first]);
    let old = StreamKey { origin: node(), incarnation: first, stream: stream("a") };
    assert_eq!(log.read(&old, 1, 10).unwrap().len(), 2, "what it held stays readable");
    log.close();
    drop(log);
    let log = rocks(dir.path(), opts());
    assert_eq!(log.store().earlier_incarnations(), [first], "closed cleanly since: not moved again");
}

#[tokio::test]
async fn records_stored_under_a_larger_payload_limit_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let big = StoreOptions { limits: Limits { max_payload_bytes: 2 * 1024 * 1024 }, ..StoreOptions::default() };
    let payload = vec![7u8; 1536 * 1024];
    {
        let log = rocks(dir.path(), big);
        log.append_durable(stream("frames"), draft(&payload)).await.unwrap();
        log.close();
    }
    // The configured limit is lowered back to the default (1 MiB), and a read-only reader
    // (`strata log tail`) has no configuration at all: both read the record as it is.
    let log = rocks(dir.path(), StoreOptions::default());
    let key = log.local_key(&stream("frames"));
    assert_eq!(log.read(&key, 1, 1).unwrap()[0].payload, payload);
    let err = log.append_durable(stream("frames"), draft(&payload)).await.unwrap_err();
    assert!(matches!(err, LogError::Encode(codec::EncodeError::PayloadTooLarge { .. })), "new input still meets the limit: {err:?}");
    let reader = RocksStore::open_read_only(dir.path()).unwrap();
    assert_eq!(reader.read(&key, 1, 1).unwrap()[0].payload, payload);
}

/// A record refused for its size, received or appended, leaves no trace: a stream it would
/// have started is not created (empty, in `strata log ls` and after a reopen).
#[tokio::test]
async fn a_refused_record_of_a_new_stream_creates_no_stream() {
    let dir = tempfile::tempdir().unwrap();
    let names = |log: &Log| log.streams().into_iter().map(|i| i.stream.as_str().to_owned()).collect::<Vec<_>>();
    {
        let log = rocks(dir.path(), StoreOptions::default());
        let mut big = remote("fog-9", 1, "q", 1);
        big.payload = vec![0; 2 * 1024 * 1024];
        assert!(matches!(log.insert_remote(big).await, Err(LogError::Encode(_))));
        log.insert_remote(remote("fog-9", 1, "r", 1)).await.unwrap();
        assert!(matches!(log.append_durable(stream("local"), draft(&vec![0; 2 * 1024 * 1024])).await, Err(LogError::Encode(_))));
        assert_eq!(names(&log), ["r"]);
        log.close();
    }
    let log = rocks(dir.path(), StoreOptions::default());
    assert_eq!(names(&log), ["r"], "after a reopen too");
}

#[tokio::test]
async fn a_sweep_removes_at_most_sweep_records_max_and_the_next_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions { retention: vec![rule("**", Some(1), None, &[])], sweep_records_max: 3, ..StoreOptions::default() };
    let log = rocks(dir.path(), opts);
    let s = stream("r");
    for i in 0..7u8 {
        log.append_durable(s.clone(), draft(&[i])).await.unwrap();
    }
    let removed: Vec<(u64, u64)> = {
        let mut out = Vec::new();
        for _ in 0..4 {
            let r = log.sweep(now_ms()).await.unwrap();
            out.push((r.removed, r.unfinished));
        }
        out
    };
    assert_eq!(removed, [(3, 1), (3, 1), (1, 0), (0, 0)]);
    assert_eq!(log.stream(&log.local_key(&s)).unwrap().count, 0);
}

/// `log.present_ranges_max` bounds the disjoint ranges of received records above a stream's
/// watermark: one more is deferred to replay. A store reopened with a lower bound still counts
/// every record it holds as present (a record it holds is not stored again).
#[tokio::test]
async fn present_ranges_max_defers_what_would_open_one_more_range() {
    let dir = tempfile::tempdir().unwrap();
    let key = StreamKey::of(&remote("fog-9", 3, "r", 1).id);
    let log = rocks(dir.path(), StoreOptions { present_ranges_max: 2, ..StoreOptions::default() });
    for (seq, expected) in [
        (2, Inserted::Stored { watermark: 0 }),
        (4, Inserted::Stored { watermark: 0 }),
        (6, Inserted::Deferred { watermark: 0 }),
        (5, Inserted::Stored { watermark: 0 }),
        (1, Inserted::Stored { watermark: 2 }),
        (7, Inserted::Stored { watermark: 2 }),
        (9, Inserted::Deferred { watermark: 2 }),
    ] {
        assert_eq!(log.insert_remote(remote("fog-9", 3, "r", seq)).await.unwrap(), expected, "seq {seq}");
    }
    assert_eq!(log.gaps(&key, 10), vec![3..=3, 6..=6]);
    log.close();
    drop(log);

    let log = rocks(dir.path(), StoreOptions { present_ranges_max: 1, ..StoreOptions::default() });
    assert_eq!(log.gaps(&key, 10), vec![3..=3, 6..=6], "both ranges held are present after the reopen");
    assert_eq!(log.insert_remote(remote("fog-9", 3, "r", 7)).await.unwrap(), Inserted::Duplicate { watermark: 2 });
    assert_eq!(log.insert_remote(remote("fog-9", 3, "r", 9)).await.unwrap(), Inserted::Deferred { watermark: 2 });
    assert_eq!(log.insert_remote(remote("fog-9", 3, "r", 6)).await.unwrap(), Inserted::Stored { watermark: 2 });
    let info = log.stream(&key).unwrap();
    assert_eq!((info.count, info.last), (6, 7), "1, 2, 4, 5, 6 and 7, each once");
    log.close();
}

/// RocksDB's own info log (`LOG`, `LOG.old.*` in the store's directory) keeps at most
/// `log.info_log_files_max` files (RocksDB alone keeps 1,000; each open starts a new one) and
/// rolls at `log.info_log_file_bytes_max` (an open alone writes about 75 KiB here).
#[tokio::test]
async fn rocksdb_info_log_files_are_bounded() {
    let info_logs = |dir: &Path| -> Vec<u64> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().starts_with("LOG"))
            .map(|e| e.metadata().unwrap().len())
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..6 {
        let log = rocks(dir.path(), StoreOptions { info_log_files_max: 2, ..StoreOptions::default() });
        log.append_durable(stream("r"), draft(b"x")).await.unwrap();
        log.close();
    }
    assert_eq!(info_logs(dir.path()).len(), 2, "six opens, two files kept");

    let dir = tempfile::tempdir().unwrap();
    let bytes_max = 65536;
    let log = rocks(dir.path(), StoreOptions { info_log_files_max: 1000, info_log_file_bytes_max: bytes_max, ..StoreOptions::default() });
    log.close();
    let sizes = info_logs(dir.path());
    assert!(sizes.len() >= 2, "one open rolled the file at {bytes_max} bytes: {sizes:?}");
    // A file rolls once it reached the bound, so it may end with the line that crossed it.
    assert!(sizes.iter().all(|&n| n < bytes_max as u64 + 16384), "{sizes:?}");
}

/// Two table blocks fail RocksDB's checksum with a readable one between them:
/// `readable_after` stops at the first readable seq after the first damaged block, never past
/// the readable records between the two.
#[tokio::test]
async fn readable_after_stops_before_the_next_damaged_block() {
    let dir = tempfile::tempdir().unwrap();
    let log = rocks(dir.path(), StoreOptions::default());
    for i in 0..600u32 {
        log.append_durable(stream("r"), draft(format!("{{\"value\":{i},\"pad\":\"{}\"}}", "x".repeat(40)).as_bytes())).await.unwrap();
    }
    let key = log.local_key(&stream("r"));
    log.close();
    drop(log);
    // The second and the fourth data blocks.
    damage_table_blocks(dir.path(), &[5_000, 13_500]);
    let log = rocks(dir.path(), StoreOptions::default());
    let fails = |seq: u64| matches!(log.read(&key, seq, 1), Err(LogError::Corrupt { .. }));
    let bad: Vec<u64> = (1..=600).filter(|&s| fails(s)).collect();
    let first = bad[0];
    let second = bad.windows(2).find(|w| w[1] != w[0] + 1).map(|w| w[1]).expect("a second damaged block, apart from the first");
    let after = log.readable_after(&key, first, 600).unwrap().expect("readable records above");
    assert!(!fails(after) && fails(after - 1), "{after} is where reading works again");
    assert!(after < second, "stopped at {after}, before the second damaged block at {second}");
}

/// A table block of stream `a` fails RocksDB's checksum: a retention sweep keeps that stream
/// as it is (it cannot read what it would remove) and reports it, and sweeps the others.
#[tokio::test]
async fn a_damaged_table_block_stops_retention_in_its_stream_only() {
    let dir = tempfile::tempdir().unwrap();
    let opts = || StoreOptions { retention: vec![rule("**", Some(1000), None, &[])], ..StoreOptions::default() };
    let log = rocks(dir.path(), StoreOptions::default());
    for name in ["a", "b"] {
        for i in 0..300u32 {
            log.append_durable(stream(name), draft(format!("{{\"value\":{i},\"pad\":\"{}\"}}", "x".repeat(40)).as_bytes())).await.unwrap();
        }
    }
    let (a, b) = (log.local_key(&stream("a")), log.local_key(&stream("b")));
    log.close();
    drop(log);
    // The first data block holds stream a's first records (a sorts before b).
    damage_table_blocks(dir.path(), &[64]);
    let log = rocks(dir.path(), opts());
    assert!(matches!(log.read(&a, 1, 1), Err(LogError::Corrupt { .. })));
    let report = log.sweep(now_ms()).await.unwrap();
    assert_eq!(report.unreadable, 1, "{report:?}");
    assert!(report.first_unreadable.as_deref().is_some_and(|e| e.contains(&format!("{a} from #1: ")) && e.contains("checksum")), "{report:?}");
    assert_eq!(log.stream(&a).unwrap().count, 300, "stream a kept as it was");
    let kept = log.stream(&b).unwrap();
    assert!(kept.bytes <= 1000 && kept.count < 300, "stream b swept to its 1000 bytes: {kept:?}");
}

/// A damaged table block holding the start of stream `b` harms `b` alone: the store opens,
/// and stream `a`, which sorts just before it, is read and swept to its end. Scans used to run
/// past a stream's last record into the next one's first block: the open failed (every stream
/// was probed above its watermark), `a`'s sweep was reported unreadable, and a read of `a`
/// after retention removed its first records failed.
#[tokio::test]
async fn a_damaged_block_at_the_start_of_a_stream_harms_only_that_stream() {
    let dir = tempfile::tempdir().unwrap();
    let log = rocks(dir.path(), StoreOptions::default());
    // `a`'s last record and `b`'s first are larger than a table block (4 KiB): `b`'s first
    // record then starts a block of its own, found in the table file by its marker.
    let big = |marker: &str| format!("{{\"value\":1,\"pad\":\"{marker}{}\"}}", "x".repeat(8000));
    for i in 0..300u32 {
        let payload = if i == 299 { big("LAST-OF-A") } else { format!("{{\"value\":{i},\"pad\":\"{}\"}}", "x".repeat(40)) };
        log.append_durable(stream("a"), draft(payload.as_bytes())).await.unwrap();
    }
    log.append_durable(stream("b"), draft(big("FIRST-OF-B").as_bytes())).await.unwrap();
    for i in 0..300u32 {
        log.append_durable(stream("b"), draft(format!("{{\"value\":{i}}}").as_bytes())).await.unwrap();
    }
    let (a, b) = (log.local_key(&stream("a")), log.local_key(&stream("b")));
    log.close();
    drop(log);
    let table = damage_table_blocks(dir.path(), &[]);
    let bytes = std::fs::read(&table).unwrap();
    let at = bytes.windows(10).position(|w| w == b"FIRST-OF-B").expect("b's first record in the table file");
    damage_table_blocks(dir.path(), &[at]);

    let log = rocks(dir.path(), StoreOptions { retention: vec![rule("a", Some(20_000), None, &[])], ..StoreOptions::default() });
    assert!(matches!(log.read(&b, 1, 1), Err(LogError::Corrupt { .. })), "b's first block is damaged");
    assert_eq!(log.read(&a, 1, 1000).unwrap().len(), 300, "all of a");
    let report = log.sweep(now_ms()).await.unwrap();
    assert_eq!(report.unreadable, 0, "a is swept to its end: {report:?}");
    let kept = log.stream(&a).unwrap();
    assert!(kept.count < 300 && kept.bytes <= 20_000, "{kept:?}");
    let read = log.read(&a, 1, 1000).unwrap();
    assert_eq!((read.len() as u64, read.last().map(|e| e.id.seq.get())), (kept.count, Some(300)), "what retention kept, to the end");
}

/// `next_held`: where a read from a seq lands, past a gap or what retention removed.
#[tokio::test]
async fn next_held_skips_gaps_and_what_retention_removed() {
    let log = mem(vec![rule("r", Some(1), None, &[])]);
    for seq in (5..=10).chain(15..=20) {
        log.insert_remote(remote("fog-9", 1, "q", seq)).await.unwrap();
    }
    let key = StreamKey::of(&remote("fog-9", 1, "q", 1).id);
    let held: Vec<Option<u64>> = [1, 5, 7, 11, 14, 15, 20, 21].iter().map(|&s| log.next_held(&key, s)).collect();
    assert_eq!(held, [Some(5), Some(5), Some(7), Some(15), Some(15), Some(15), Some(20), None]);
    for _ in 0..4 {
        log.append_durable(stream("r"), draft(b"x")).await.unwrap();
    }
    let own = log.local_key(&stream("r"));
    log.sweep(now_ms()).await.unwrap();
    assert_eq!(log.next_held(&own, 1), None, "retention removed everything");
    log.append_durable(stream("r"), draft(b"y")).await.unwrap();
    let first = log.stream(&own).unwrap().first;
    assert!(first > 1, "retention removed the first records");
    assert_eq!(log.next_held(&own, 1), Some(first));
}

/// A record of this node's own stream has a monotonic instant by which it was durable, which
/// a peer's clock cannot move: here a received envelope 450 ms ahead pushes the HLC (within
/// its accepted drift, 500 ms), so the next append's timestamp is ahead of the wall clock and
/// `now - hlc` reads it as fresh 30 ms later, while `durable_by` gives its real age. Records durable before the store opened get
/// the instant it opened; another node's stream and a record not written yet get none.
#[tokio::test]
async fn a_records_durable_instant_bounds_its_age_whatever_the_hlc() {
    let dir = tempfile::tempdir().unwrap();
    let s = stream("readings/own");
    let log = rocks(dir.path(), StoreOptions::default());
    let mut ahead = remote("fog-9", 1, "q", 1);
    let t = ahead.hlc.as_uhlc();
    let later = uhlc::NTP64(t.get_time().0 + uhlc::NTP64::from(Duration::from_millis(450)).0);
    ahead.hlc = HlcTime::from_uhlc(uhlc::Timestamp::new(later, *t.get_id()));
    log.insert_remote(ahead.clone()).await.unwrap();
    let before = std::time::Instant::now();
    let appended = log.append_durable(s.clone(), draft(b"x")).await.unwrap();
    let after = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let unix_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64;
    assert_eq!(unix_us.saturating_sub(appended.hlc.unix_us()), 0, "the HLC is ahead of the wall clock: it reads the record as fresh");
    let key = log.local_key(&s);
    let durable = log.durable_by(&key, 1).expect("durable");
    assert!(durable >= before && durable <= after, "durable while it was appended");
    assert!(durable.elapsed() >= Duration::from_millis(30));
    assert_eq!(log.durable_by(&key, 2), None, "not written yet");
    assert_eq!(log.durable_by(&StreamKey::of(&ahead.id), 1), None, "another node's stream");
    log.close();
    drop(log);
    let opened = std::time::Instant::now();
    let log = rocks(dir.path(), StoreOptions::default());
    let reopened = log.durable_by(&key, 1).expect("durable before the store opened");
    assert!(reopened >= opened && reopened <= std::time::Instant::now());
    log.append_durable(s.clone(), draft(b"y")).await.unwrap();
    assert_eq!(log.durable_by(&key, 1), Some(reopened), "still the open's instant");
    assert!(log.durable_by(&key, 2).unwrap() > reopened);
}

/// Beyond the bound of instants kept per stream, older records get the instant of the newest
/// batch let go: later than their own, never earlier (their age is never overstated).
#[tokio::test]
async fn older_records_get_a_later_durable_instant_never_an_earlier_one() {
    let log = mem(Vec::new());
    let s = stream("r");
    let mut instants = Vec::new();
    for _ in 0..400 {
        let e = log.append_durable(s.clone(), draft(b"x")).await.unwrap();
        instants.push(log.durable_by(&log.local_key(&s), e.id.seq.get()).unwrap());
    }
    let key = log.local_key(&s);
    let now: Vec<std::time::Instant> = (1..=400).map(|seq| log.durable_by(&key, seq).unwrap()).collect();
    assert_eq!(now[399], instants[399], "recent ones keep their own");
    assert_eq!(now[144], instants[144]);
    for (seq, (kept, own)) in now.iter().zip(&instants).enumerate() {
        assert!(kept >= own, "seq {}: an earlier instant than its own", seq + 1);
    }
    assert_eq!(now[143], instants[400 - 256 - 1], "the newest let go");
    assert_eq!(now[0], instants[400 - 256 - 1], "the newest let go");
}
