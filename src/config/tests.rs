use super::*;

use super::env::MapEnv;

fn no_env() -> MapEnv {
    MapEnv::new(&[("HOME", "/home/t")])
}

fn load_str(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, Source::Embedded, "test.toml", &no_env())
}

#[test]
fn embedded_default_matches_code_defaults() {
    let parsed: RawConfig = toml::from_str(DEFAULT_TOML).unwrap();
    let with_upstreams = RawConfig {
        upstreams: parsed.upstreams.clone(),
        ..RawConfig::default()
    };
    assert_eq!(
        parsed, with_upstreams,
        "default.toml and the Default impls disagree"
    );
    let c = load_str(DEFAULT_TOML).unwrap();
    assert_eq!(c.server.listen.as_deref(), Some("0.0.0.0:8080"));
    assert_eq!(c.upstreams.len(), 1);
    assert_eq!(c.upstreams[0].url, "https://cache.nixos.org");
    assert_eq!(
        c.upstreams[0].public_keys,
        vec!["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=".to_string()]
    );
    assert_eq!(c.cache.max_entries, 100_000);
    assert_eq!(c.cache.narinfo_memory, 64 << 20);
    assert_eq!(c.cache.ttl, Duration::from_secs(3600));
    assert_eq!(c.timeouts.idle, c.server.read_timeout);
}

#[test]
fn empty_file_takes_defaults_including_upstreams() {
    let c = load_str("").unwrap();
    assert_eq!(c.upstreams[0].url, "https://cache.nixos.org");
    assert_eq!(c.server.cache_priority, 30);
    assert_eq!(c.logging.format, LogFormat::Json);
}

#[test]
fn ncro22_example_config_is_accepted_unchanged() {
    let text = include_str!("../../tests/data/ncro22-example.toml");
    let c = load_str(text).unwrap();
    assert_eq!(c.upstreams.len(), 4);
    assert!(matches!(c.upstreams[2].kind, UpstreamKind::S3(_)));
    assert_eq!(
        c.upstreams[3].basic_auth,
        Some(("ncro".into(), Some("hunter2".into())))
    );
    assert_eq!(c.cache.db_path, "/var/lib/ncro/routes.db");
    assert!(
        !c.render_effective().contains("hunter2"),
        "password must be redacted"
    );
}

#[test]
fn misspelled_key_names_key_and_line() {
    let err = load_str("[server]\nlisten = \":1\"\nlisen = \":2\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("lisen"), "{err}");
    assert!(err.contains("line 3"), "{err}");
    let err = load_str("[cache.mass_query]\nmax_concurent_races = 3\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("max_concurent_races") && err.contains("line 2"),
        "{err}"
    );
    let err = load_str("[[upstreams]]\nurl = \"http://a\"\npublickey = \"x\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("publickey") && err.contains("line 3"), "{err}");
}

#[test]
fn invalid_values_name_the_key() {
    let cases = [
        ("[server]\ncache_priority = 0\n", "server.cache_priority must be >= 1, got 0"),
        ("[server]\nread_timeout = \"soon\"\n", "invalid duration \"soon\""),
        ("[server]\nread_timeout = \"0s\"\n", "server.read_timeout must be positive"),
        ("[cache]\nlatency_alpha = 1.0\n", "cache.latency_alpha must be between 0 and 1 exclusive"),
        ("[health]\nearly_start_budget = 1.5\n", "health.early_start_budget must be between 0 and 1"),
        ("[health]\nearly_start_window = \"0s\"\n", "health.early_start_window must be positive"),
        ("[cache]\nmax_entries = 0\n", "cache.max_entries must be positive"),
        ("[cache]\nnarinfo_memory_mb = 0\n", "cache.narinfo_memory_mb must be positive"),
        ("[cache.mass_query]\nmax_concurrent_races = 0\n", "cache.mass_query.max_concurrent_races must be >= 1"),
        ("upstreams = []\n", "at least one upstream is required"),
        ("[[upstreams]]\nurl = \"\"\n", "upstream[0]: URL is empty"),
        ("[[upstreams]]\nurl = \"ftp://x\"\n", "scheme must be http, https or s3"),
        ("[[upstreams]]\nurl = \"http://x:99999\"\n", "invalid port"),
        ("[[upstreams]]\nurl = \"http://x\"\npublic_key = \"nokey\"\n", "invalid public_key"),
        ("[[upstreams]]\nurl = \"http://x\"\npublic_key = \"k:AAAA\"\n", "want 32"),
        ("[[upstreams]]\nurl = \"http://x\"\n[[upstreams]]\nurl = \"http://x/\"\n", "duplicate URL"),
        ("[[upstreams]]\nurl = \"http://x\"\n[[upstreams.filters]]\npattern = \"\"\n", "upstream[0].filters[0]: pattern is empty"),
        ("[[upstreams]]\nurl = \"http://x\"\n[[upstreams.filters]]\naction = \"maybe\"\npattern = \"a\"\n", "maybe"),
        ("[logging]\nformat = \"xml\"\n", "logging.format must be"),
        ("[logging]\nlevel = \"loud=[\"\n", "logging.level"),
        ("[logging]\nlevel = \"inof\"\n", "is not a level"),
        ("[server]\nnar_relay = \"teleport\"\n", "teleport"),
        ("[server]\nworkers = 2\ncpus = [0]\n", "server.cpus lists 1 CPUs but server.workers = 2"),
        ("[server]\ncpus = [1, 1]\n", "lists a CPU twice"),
        ("[server]\nlisten = \"nohost\"\n", "server.listen"),
        ("[mesh]\nenabled = true\n", "no peers configured"),
        ("[mesh]\nenabled = true\n[[mesh.peers]]\naddr = \"127.0.0.1:1\"\n", "public_key is required"),
        ("[[mesh.peers]]\naddr = \"x:1\"\npublic_key = \"zz\"\n", "hex-encoded 32-byte"),
        ("[mesh]\nreplay_window = \"0s\"\n", "mesh.replay_window must be positive"),
        ("[mesh]\nenabled = true\nallow_unauthenticated = true\n[[mesh.peers]]\naddr = \"fd00::1:7946\"\n", "must be host:port"),
        ("[[upstreams]]\nurl = \"s3://b?bogus=1\"\n", "unknown parameter"),
        ("[discovery]\naddress_family = \"ipv5\"\n", "ipv5"),
        ("[discovery]\nmax_upstreams = 0\n", "discovery.max_upstreams must be between 1 and 1024, got 0"),
        ("[discovery]\nmax_upstreams = 1025\n", "got 1025"),
    ];
    for (text, want) in cases {
        let err = match load_str(text) {
            Ok(_) => panic!("accepted invalid config:\n{text}"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(want),
            "config:\n{text}\nerror {err:?} lacks {want:?}"
        );
    }
}

/// Found by the `config` fuzz target: tracing-subscriber panicked on a
/// directive with leading whitespace and a multi-byte character.
#[test]
fn regression_log_level_with_space_and_multibyte_char_is_an_error_not_a_panic() {
    let level = |l: &str| load_str(&format!("[logging]\nlevel = \"{l}\"\n"));
    let err = level("  ipe\u{feff}R=RRRRrs").expect_err("not a level");
    assert!(err.to_string().contains("logging.level"), "{err}");
    // Targets may be any text; whitespace around directives is removed.
    for (given, kept) in [
        (" \u{e9}=info", "\u{e9}=info"),
        (
            "info,  \u{e9}t\u{e9}[x]=debug",
            "info,\u{e9}t\u{e9}[x]=debug",
        ),
        (" info , ncro::access=debug ", "info,ncro::access=debug"),
    ] {
        assert_eq!(level(given).unwrap().logging.level, kept);
    }
}

/// Found by the `config` fuzz target: with regex field values, this level
/// kept `ncro check-config` busy for minutes compiling a DFA.
#[test]
fn regression_log_level_field_values_are_not_compiled_as_regexes() {
    let level = concat!(
        "[[[{ 21:8P0:= ::",
        "...................................................................................",
        "@@@@@@@@@@@@@@@@@@@@@@@@H@@@@@@@@@@@`@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@",
        "::::|::]:= :::]:= ::}"
    );
    let started = std::time::Instant::now();
    let parsed = load_str(&format!("[logging]\nlevel = \"{level}\"\n"));
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    // The outcome either way, not the time, is what a user sees.
    if let Err(e) = parsed {
        assert!(e.to_string().contains("logging.level"), "{e}");
    }
    // A literal field value still filters.
    let c = load_str("[logging]\nlevel = \"info,ncro[conn{peer=a.b}]=debug\"\n").unwrap();
    assert_eq!(c.logging.level, "info,ncro[conn{peer=a.b}]=debug");
}

#[test]
fn env_overrides_apply_when_non_empty() {
    let env = MapEnv::new(&[
        ("NCRO_LISTEN", "127.0.0.1:9999"),
        ("NCRO_DB_PATH", "/tmp/x.db"),
        ("NCRO_LOG_LEVEL", "debug"),
    ]);
    let c = Config::from_toml("", Source::Embedded, "t", &env).unwrap();
    assert_eq!(c.server.listen.as_deref(), Some("127.0.0.1:9999"));
    assert_eq!(c.cache.db_path, "/tmp/x.db");
    assert_eq!(c.logging.level, "debug");
    let env = MapEnv::new(&[("NCRO_LISTEN", ""), ("HOME", "/h")]);
    let c = Config::from_toml("", Source::Embedded, "t", &env).unwrap();
    assert_eq!(c.server.listen.as_deref(), Some("0.0.0.0:8080"));
    // An override is validated like the file value.
    let env = MapEnv::new(&[("NCRO_LOG_LEVEL", "very=loud=")]);
    assert!(Config::from_toml("", Source::Embedded, "t", &env).is_err());
}

#[test]
fn default_db_path_follows_state_directory() {
    let env = MapEnv::new(&[("STATE_DIRECTORY", "/var/lib/ncro-x:/other")]);
    assert_eq!(default_db_path(&env), "/var/lib/ncro-x/routes.db");
    let c = load_str("[cache]\ndb_path = \":memory:\"\n").unwrap();
    assert_eq!(c.cache.db_path, ":memory:");
}

#[test]
fn empty_listen_is_allowed_for_socket_activation() {
    let c = load_str("[server]\nlisten = \"\"\n").unwrap();
    assert_eq!(c.server.listen, None);
}

#[test]
fn several_public_keys_and_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let text = format!(
        "[[upstreams]]\nurl = \"https://h:8443/prefix/\"\npublic_key = \"a:{k}\"\npublic_keys = [\"b:{k}\", \"a:{k}\"]\nusername = \"u\"\npassword_file = \"{}\"\n",
        pw.display(),
        k = "6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY"
    );
    let c = load_str(&text).unwrap();
    let u = &c.upstreams[0];
    assert_eq!(u.url, "https://h:8443/prefix");
    assert_eq!(u.public_keys.len(), 2);
    assert_eq!(u.basic_auth, Some(("u".into(), Some("s3cret".into()))));
}

#[test]
fn max_connections_defaults_to_ten_thousand_and_zero_means_no_cap() {
    assert_eq!(load_str("").unwrap().server.max_connections, 10_000);
    let c = load_str("[server]\nmax_connections = 0\n").unwrap();
    assert_eq!(c.server.max_connections, 0);
    let c = load_str("[server]\nmax_connections = 3\n").unwrap();
    assert_eq!(c.server.max_connections, 3);
    let err = load_str("[server]\nmax_connections = -1\n").unwrap_err();
    assert!(err.to_string().contains("max_connections"), "{err}");
}

#[test]
fn index_keys_are_validated() {
    let c = load_str("[index]\nmax_age = \"30s\"\npublish = true\nfalse_positive_rate = 0.001\n")
        .unwrap();
    assert!(c.index.enabled && c.index.publish);
    assert_eq!(c.index.max_age, std::time::Duration::from_secs(30));
    assert_eq!(c.index.false_positive_rate, 0.001);
    for (bad, key) in [
        ("false_positive_rate = 1.0", "index.false_positive_rate"),
        ("false_positive_rate = 0.0", "index.false_positive_rate"),
        ("refresh_interval = \"0s\"", "index.refresh_interval"),
        ("max_age = \"0s\"", "index.max_age"),
        ("max_bytes = 10", "index.max_bytes"),
        ("max_items = 0", "index.max_items"),
    ] {
        let err = load_str(&format!("[index]\n{bad}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{bad}: {err}");
    }
}
