use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::provider::SharedCredentialsProvider;
use aws_credential_types::Credentials;

use super::credentials::{self, next_refresh, retry_after};
use super::presign::encode_key_path;
use super::*;
use crate::http::client::Method;

fn creds(key: &str, secret: &str, token: Option<&str>, expiry: Option<SystemTime>) -> Credentials {
    Credentials::new(key, secret, token.map(str::to_owned), expiry, "test")
}

fn cell_with(c: Credentials) -> Arc<CredentialCell> {
    let cell = Arc::new(CredentialCell::default());
    assert_eq!(cell.publish(c), Some(1));
    cell
}

fn presigner(url: &str, cell: Arc<CredentialCell>) -> Presigner {
    let parsed = S3Url::parse(url).expect("valid s3 URL");
    let (o, p) = origin(&parsed, url, cell).expect("origin");
    Presigner::new(
        url,
        &parsed,
        &Endpoint::for_url(&parsed),
        String::from_utf8(o.host_header().to_vec()).expect("ascii host"),
        p.credentials().clone(),
    )
}

/// A parameter of a presigned target's query string.
fn param<'a>(target: &'a str, name: &str) -> Option<&'a str> {
    let query = target.split_once('?')?.1;
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

#[test]
fn presign_matches_the_aws_documentation_example() {
    // "Authenticating Requests: Using Query Parameters (AWS Signature
    // Version 4)", Amazon S3 API reference: GET examplebucket/test.txt on
    // 2013-05-24, valid 86400 s, with the documented example key pair.
    let cell = cell_with(creds(
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        None,
        None,
    ));
    let url = S3Url::parse("s3://examplebucket?addressing-style=virtual").expect("url");
    let endpoint = Endpoint {
        base: "https://examplebucket.s3.amazonaws.com".into(),
        key_prefix: String::new(),
    };
    let p = Presigner::new(
        "s3://examplebucket",
        &url,
        &endpoint,
        "examplebucket.s3.amazonaws.com".into(),
        cell,
    )
    .with_expiry(Duration::from_secs(86400));
    let at = UNIX_EPOCH + Duration::from_secs(1_369_353_600);
    let signed = p.presign(Method::Get, "/test.txt", at).expect("signs");
    assert!(signed.target.starts_with("/test.txt?"), "{}", signed.target);
    assert_eq!(
        param(&signed.target, "X-Amz-Signature"),
        Some("aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")
    );
    assert_eq!(
        param(&signed.target, "X-Amz-Credential"),
        Some("AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request")
    );
    assert_eq!(param(&signed.target, "X-Amz-SignedHeaders"), Some("host"));
    assert_eq!(param(&signed.target, "X-Amz-Expires"), Some("86400"));
    assert_eq!(signed.generation, 1);
}

#[test]
fn presign_path_style_with_session_token() {
    let cell = cell_with(creds("AKID", "secret", Some("tok/en+="), None));
    let p = presigner(
        "s3://nixcache?endpoint=127.0.0.1:3900&scheme=http&region=garage",
        cell,
    );
    let now = SystemTime::now();
    let s = p
        .presign(Method::Head, "/nar/abc.nar.xz?versionId=1", now)
        .expect("signs");
    assert!(
        s.target.starts_with("/nixcache/nar/abc.nar.xz?X-Amz-"),
        "{}",
        s.target
    );
    assert!(!s.target.contains("versionId"), "client query is dropped");
    assert_eq!(
        param(&s.target, "X-Amz-Security-Token"),
        Some("tok%2Fen%2B%3D")
    );
    let credential = param(&s.target, "X-Amz-Credential").expect("credential");
    assert!(
        credential.ends_with("%2Fgarage%2Fs3%2Faws4_request"),
        "{credential}"
    );
    // Printable ASCII only: the client's request validation accepts it.
    assert!(s.target.bytes().all(|b| (0x21..=0x7e).contains(&b)));
    // Same request a second later: another signature.
    let later = p
        .presign(
            Method::Head,
            "/nar/abc.nar.xz",
            now + Duration::from_secs(1),
        )
        .expect("signs");
    assert_ne!(
        param(&s.target, "X-Amz-Signature"),
        param(&later.target, "X-Amz-Signature")
    );
}

#[test]
fn presign_needs_live_credentials() {
    let url = "s3://b?endpoint=127.0.0.1:1&scheme=http";
    let empty = presigner(url, Arc::new(CredentialCell::default()));
    let now = SystemTime::now();
    assert!(matches!(
        empty.presign(Method::Get, "/x.narinfo", now),
        Err(S3Error::NoCredentials)
    ));
    let past = now - Duration::from_secs(1);
    let expired = presigner(url, cell_with(creds("a", "b", Some("t"), Some(past))));
    assert!(matches!(
        expired.presign(Method::Get, "/x.narinfo", now),
        Err(S3Error::CredentialsExpired)
    ));
}

#[test]
fn key_paths_are_encoded_once_and_dot_segments_refused() {
    let enc = |p: &str| {
        let mut s = String::new();
        encode_key_path(p, &mut s).map(|()| s)
    };
    assert_eq!(enc("/nar/0abc.nar.xz").unwrap(), "/nar/0abc.nar.xz");
    assert_eq!(enc("/a b+c").unwrap(), "/a%20b%2Bc");
    assert_eq!(
        enc("/a%20b%2bc").unwrap(),
        "/a%20b%2Bc",
        "escapes normalised"
    );
    assert_eq!(enc("/~x_y-z.").unwrap(), "/~x_y-z.");
    for bad in [
        "/a/../b",
        "/./a",
        "/..",
        "/%2e%2e/x",
        "/a%zz",
        "/a%+f",
        "/a%2",
        "rel",
    ] {
        assert!(matches!(enc(bad), Err(S3Error::BadPath)), "{bad}");
    }
}

#[test]
fn endpoints_follow_ncro_2_2_addressing() {
    let ep = |u: &str| Endpoint::for_url(&S3Url::parse(u).expect("url"));
    let e = ep("s3://cache");
    assert_eq!(
        (e.base.as_str(), e.key_prefix.as_str()),
        ("https://cache.s3.us-east-1.amazonaws.com", "")
    );
    let e = ep("s3://my.cache?region=eu-west-1&scheme=http");
    assert_eq!(
        (e.base.as_str(), e.key_prefix.as_str()),
        ("https://s3.eu-west-1.amazonaws.com", "/my.cache"),
        "dotted bucket: path-style; no endpoint: https whatever `scheme` says"
    );
    let e = ep("s3://c?endpoint=minio:9000&scheme=http");
    assert_eq!(
        (e.base.as_str(), e.key_prefix.as_str()),
        ("http://minio:9000", "/c")
    );
    let e = ep("s3://c?endpoint=r2.example&addressing-style=virtual");
    assert_eq!(
        (e.base.as_str(), e.key_prefix.as_str()),
        ("https://c.r2.example", "")
    );
    assert_eq!(
        ep("s3://c?region=cn-north-1").base,
        "https://c.s3.cn-north-1.amazonaws.com.cn"
    );
}

#[test]
fn origin_shows_the_configured_url_and_signs_its_host() {
    let url = "s3://nixcache?endpoint=127.0.0.1:3900&scheme=http&region=garage";
    let parsed = S3Url::parse(url).expect("url");
    let (o, _) = origin(&parsed, url, Arc::default()).expect("origin");
    assert_eq!(o.to_string(), url);
    assert_eq!(o.host_header(), b"127.0.0.1:3900");
    assert_eq!(
        o.path_prefix(),
        "",
        "the bucket is part of the signed key path"
    );
    assert!(!o.is_tls());
    let https = S3Url::parse("s3://c?endpoint=s3.example:443").expect("url");
    let (o, _) = origin(&https, "s3://c?endpoint=s3.example:443", Arc::default()).expect("origin");
    assert_eq!(
        o.host_header(),
        b"s3.example",
        "default port left out, as sent"
    );
}

#[test]
fn error_codes_from_s3_bodies() {
    let aws = b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match</Message></Error>";
    assert_eq!(error_code(aws), Some("SignatureDoesNotMatch"));
    let garage = b"<Error><Code>AccessDenied</Code><Message>Forbidden: Invalid signature</Message><Resource>/b/k</Resource><Region>garage</Region></Error>";
    assert_eq!(error_code(garage), Some("AccessDenied"));
    assert_eq!(
        error_code(b"<Error><Code> NoSuchKey </Code></Error>"),
        Some("NoSuchKey")
    );
    for junk in [
        &b""[..],
        b"not xml",
        b"<Code>",
        b"<Code></Code>",
        b"<Code>a b</Code>",
    ] {
        assert_eq!(error_code(junk), None);
    }
}

#[test]
fn classification_of_refusals() {
    use Verdict::{Denied, Miss};
    let cases = [
        (404, Some("NoSuchKey"), false, Miss),
        (404, None, false, Miss),
        (404, Some("NoSuchBucket"), true, Denied),
        (403, Some("AccessDenied"), true, Miss),
        (403, None, true, Miss),
        (403, Some("AccessDenied"), false, Denied),
        (403, None, false, Denied),
        (403, Some("SignatureDoesNotMatch"), true, Denied),
        (403, Some("InvalidAccessKeyId"), true, Denied),
        (403, Some("ExpiredToken"), true, Denied),
        (403, Some("RequestTimeTooSkewed"), true, Denied),
    ];
    for (status, code, confirmed, want) in cases {
        assert_eq!(
            classify(status, code, confirmed),
            want,
            "{status} {code:?} {confirmed}"
        );
    }
}

#[test]
fn confirmation_follows_the_credentials_generation() {
    let cell = cell_with(creds("a", "b", None, None));
    let p = presigner("s3://b?endpoint=127.0.0.1:1&scheme=http", cell.clone());
    assert!(!p.is_confirmed(1));
    p.confirm(1);
    assert!(p.is_confirmed(1));
    assert_eq!(cell.publish(creds("a", "c", None, None)), Some(2));
    assert!(!p.is_confirmed(2), "new keys must prove themselves");
    p.confirm(1); // a late answer to an old request
    assert!(!p.is_confirmed(2));
    p.confirm(2);
    p.unconfirm(1); // stale: ignored
    assert!(p.is_confirmed(2));
    p.unconfirm(2);
    assert!(!p.is_confirmed(2));
    assert!(!p.is_confirmed(0));
}

#[test]
fn publishing_unchanged_keys_keeps_the_generation() {
    let cell = CredentialCell::default();
    assert!(cell.load().is_none());
    let t = SystemTime::now() + Duration::from_secs(3600);
    assert_eq!(cell.publish(creds("a", "b", Some("t1"), Some(t))), Some(1));
    let later = t + Duration::from_secs(3600);
    assert_eq!(cell.publish(creds("a", "b", Some("t1"), Some(later))), None);
    let snap = cell.load().expect("published");
    assert_eq!((snap.generation(), snap.expires()), (1, Some(later)));
    assert_eq!(
        cell.publish(creds("a", "b", Some("t2"), Some(later))),
        Some(2)
    );
}

#[test]
fn refresh_schedule() {
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let min = |m: u64| Duration::from_secs(m * 60);
    assert_eq!(next_refresh(now, None), credentials::STATIC_REFRESH);
    assert_eq!(next_refresh(now, Some(now + min(12))), min(7));
    assert_eq!(
        next_refresh(now, Some(now + min(600))),
        credentials::STATIC_REFRESH
    );
    assert_eq!(
        next_refresh(now, Some(now + min(5))),
        credentials::MIN_REFRESH
    );
    assert_eq!(
        next_refresh(now, Some(now - min(1))),
        credentials::MIN_REFRESH
    );
    assert_eq!(retry_after(1), Duration::from_secs(5));
    assert_eq!(retry_after(3), Duration::from_secs(20));
    assert_eq!(retry_after(40), credentials::MAX_RETRY);
}

#[test]
fn refresh_task_publishes_and_signals_the_first_answer() {
    let p = Arc::new(presigner(
        "s3://b?endpoint=127.0.0.1:1&scheme=http",
        Arc::new(CredentialCell::default()),
    ));
    let provider = SharedCredentialsProvider::new(creds("AKID", "s", None, None));
    let (tx, rx) = mpsc::channel();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let task = tokio::spawn(credentials::refresh(p.clone(), provider, tx));
        let first = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10)));
        assert!(matches!(first.await, Ok(Ok(()))), "first answer signalled");
        task.abort();
    });
    let snap = p.credentials().load().expect("published");
    assert_eq!(snap.generation(), 1);
    assert!(p
        .presign(Method::Get, "/nix-cache-info", SystemTime::now())
        .is_ok());
}

#[test]
fn credentials_thread_without_s3_upstreams_is_not_started() {
    let t = CredentialsThread::start(Vec::new(), Duration::from_secs(1)).expect("ok");
    assert!(t.is_none());
}

/// Not an assertion: prints the cost of one presign on this machine.
/// `cargo test --lib s3::tests::presign_cost -- --ignored --nocapture`
#[test]
#[ignore = "timing only"]
fn presign_cost() {
    let cell = cell_with(creds("AKID", "secret", Some("session-token"), None));
    let p = presigner("s3://cache?endpoint=127.0.0.1:3900&scheme=http", cell);
    let path = "/nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz";
    let n = 20_000u32;
    let started = std::time::Instant::now();
    let now = SystemTime::now();
    for i in 0..n {
        let at = now + Duration::from_secs(u64::from(i));
        std::hint::black_box(p.presign(Method::Get, path, at).expect("signs"));
    }
    let each = started.elapsed() / n;
    eprintln!("presign: {each:?} each over {n} (GET, path-style, session token)");
}

#[test]
fn s3_upstreams_join_the_set_under_their_configured_url() {
    let s3 = "s3://nixcache?endpoint=127.0.0.1:3900&scheme=http&region=garage";
    let toml = format!(
        "[[upstreams]]\nurl = \"http://127.0.0.1:1\"\n\n[[upstreams]]\nurl = \"{s3}\"\npriority = 40\n"
    );
    let cfg = crate::config::Config::from_toml(
        &toml,
        crate::config::Source::Embedded,
        "t",
        &crate::config::env::MapEnv::new(&[]),
    )
    .expect("config");
    let set = crate::upstream::UpstreamSet::from_config(&cfg).expect("set");
    assert_eq!(set.len(), 2);
    let i = set.index_of(s3).expect("indexed by its configured URL");
    assert!(set.list[i].origin.signer().is_some());
    assert_eq!(set.list[i].origin.to_string(), s3);
    assert!(set.list[0].origin.signer().is_none());
}

#[test]
fn s3_errors_keep_their_client_error_kind_text_and_sources() {
    use std::error::Error as _;
    let bad = ClientError::from(S3Error::BadPath);
    assert_eq!(bad.kind(), "request");
    assert!(!bad.retry_elsewhere());
    let denied = ClientError::from(S3Error::Denied {
        status: 403,
        code: "AccessDenied".into(),
    });
    assert_eq!(denied.kind(), "auth");
    assert!(denied.retry_elsewhere());
    assert_eq!(
        denied.to_string(),
        "S3: S3 refused the request: 403 AccessDenied"
    );
    let endpoint = ClientError::from(S3Error::Endpoint(OriginError::MissingHost));
    let source = endpoint.source().expect("the S3 error");
    assert_eq!(source.to_string(), "invalid S3 endpoint: URL has no host");
    let inner = source.source().expect("the origin error");
    assert_eq!(inner.to_string(), "URL has no host");
    let ClientError::S3(e) = &endpoint else {
        panic!("{endpoint:?}")
    };
    assert!(matches!(
        e.get_ref().downcast_ref::<S3Error>(),
        Some(S3Error::Endpoint(_))
    ));
}
