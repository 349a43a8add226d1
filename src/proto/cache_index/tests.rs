use super::*;

/// The manifest example of the RFC's earlier revision, with the fields the
/// notes list (§3.3).
const MANIFEST: &str = r#"{
  "version": 1,
  "format": "hlssi",
  "created_at": "2026-01-15T12:00:00Z",
  "item_count": 1200000,
  "sharding": { "depth": 2, "alphabet": "0123456789abcdfghijklmnpqrsvwxyz" },
  "encoding": { "type": "golomb-rice", "parameter": 8, "hash_bits": 160, "prefix_bits": 10 },
  "journal": { "current_segment": 1705320000, "segment_duration_seconds": 300, "retention_count": 12 },
  "epoch": { "current": 42, "previous": 41 },
  "deltas": { "enabled": true, "oldest_base": 30, "compression": "zstd" }
}"#;

#[test]
fn parses_the_documented_manifest() {
    let m = Manifest::parse(MANIFEST.as_bytes()).unwrap();
    assert_eq!(
        m,
        Manifest {
            item_count: 1_200_000,
            depth: 2,
            k: 8,
            current_segment: 1_705_320_000,
            segment_duration: Some(300),
            retention_count: 12,
            epoch: 42,
            previous_epoch: Some(41),
        }
    );
    assert_eq!(m.shard_count(), 1024);
    let prefixes: Vec<String> = m.shard_prefixes().collect();
    assert_eq!(prefixes.len(), 1024);
    assert_eq!(prefixes[0], "00");
    assert_eq!(prefixes[1], "01");
    assert_eq!(prefixes[32], "10");
    assert_eq!(prefixes[1023], "zz");
    let mut sorted = prefixes.clone();
    sorted.sort();
    assert_eq!(sorted, prefixes, "prefixes come in key order");
    assert_eq!(shard_file(42, "0a"), "shards/42/0a.idx");
    assert_eq!(segment_file(7), "journal/7.log");
}

#[test]
fn refuses_what_the_rfc_does_not_define() {
    let with = |from: &str, to: &str| {
        let text = MANIFEST.replace(from, to);
        assert_ne!(text, MANIFEST, "{from}");
        Manifest::parse(text.as_bytes()).unwrap_err()
    };
    assert!(matches!(
        with("\"version\": 1", "\"version\": 2"),
        IndexError::Unsupported {
            field: "version",
            ..
        }
    ));
    assert!(matches!(
        with("hlssi", "other"),
        IndexError::Unsupported {
            field: "format",
            ..
        }
    ));
    assert!(matches!(
        with(
            "0123456789abcdfghijklmnpqrsvwxyz",
            "0123456789abcdefghijklmnopqrstuv"
        ),
        IndexError::Unsupported {
            field: "sharding.alphabet",
            ..
        }
    ));
    assert!(matches!(
        with("\"prefix_bits\": 10", "\"prefix_bits\": 8"),
        IndexError::Unsupported {
            field: "encoding.prefix_bits",
            ..
        }
    ));
    assert!(matches!(
        with("\"hash_bits\": 160", "\"hash_bits\": 128"),
        IndexError::Unsupported { .. }
    ));
    assert!(matches!(
        with("\"depth\": 2", "\"depth\": 5"),
        IndexError::Unsupported {
            field: "sharding.depth",
            ..
        }
    ));
    assert!(matches!(
        with("golomb-rice", "elias-fano"),
        IndexError::Unsupported { .. }
    ));
    assert!(matches!(
        with("\"epoch\"", "\"epochs\""),
        IndexError::Json(_)
    ));
    assert!(Manifest::parse(b"not json").is_err());
}

#[test]
fn live_segments_step_back_one_more_than_retained() {
    let m = Manifest::parse(MANIFEST.as_bytes()).unwrap();
    let segs = m.live_segments().unwrap();
    assert_eq!(segs.len(), 14);
    assert_eq!(segs[0], 1_705_320_000, "newest first");
    assert_eq!(segs[13], 1_705_320_000 - 13 * 300);
    let later = MANIFEST.replace("\"segment_duration_seconds\": 300, ", "");
    let m = Manifest::parse(later.as_bytes()).unwrap();
    assert_eq!(m.live_segments(), Err(IndexError::SegmentsUnknown));
    let none_kept = later.replace("\"retention_count\": 12", "\"retention_count\": 0");
    let m = Manifest::parse(none_kept.as_bytes()).unwrap();
    assert_eq!(m.live_segments(), Err(IndexError::SegmentsUnknown));
    let with_duration = MANIFEST.replace("\"retention_count\": 12", "\"retention_count\": 0");
    let m = Manifest::parse(with_duration.as_bytes()).unwrap();
    assert_eq!(
        m.live_segments().unwrap(),
        [1_705_320_000, 1_705_319_700],
        "the rotated segment may not be compacted yet"
    );
    let early = MANIFEST.replace("1705320000", "600");
    let m = Manifest::parse(early.as_bytes()).unwrap();
    assert_eq!(
        m.live_segments().unwrap(),
        [600, 300, 0],
        "no timestamps before 0"
    );
}

#[test]
fn journal_lines() {
    let a = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";
    let b = "kpcd173cq987hw957sx6m0868wv3x6d9";
    let h = |s: &str| StoreHash::parse(s.as_bytes()).unwrap();
    let text = format!("+{a}\n\n-{b}\r\n+{b}\n");
    assert_eq!(
        parse_journal(text.as_bytes()).unwrap(),
        [
            JournalOp::Add(h(a)),
            JournalOp::Remove(h(b)),
            JournalOp::Add(h(b))
        ]
    );
    assert_eq!(parse_journal(b"").unwrap(), []);
    // An append in progress: the unterminated last line is left for later.
    let partial = format!("+{a}\n+{}", &b[..10]);
    assert_eq!(
        parse_journal(partial.as_bytes()).unwrap(),
        [JournalOp::Add(h(a))]
    );
    let bad = format!("+{}\n+{a}\n", &b[..10]);
    assert_eq!(
        parse_journal(bad.as_bytes()),
        Err(IndexError::JournalLine { line: 1 })
    );
    assert!(parse_journal(format!("*{a}\n").as_bytes()).is_err());
    assert!(parse_journal(format!("+{a}x\n").as_bytes()).is_err());
}
