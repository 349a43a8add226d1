//! Server side: parsing client requests with httparse. HOT.
//!
//! The parser borrows from the connection's read buffer; nothing is copied
//! or allocated per request.

/// Largest request head accepted (request line + headers); more is 431.
pub const MAX_HEAD: usize = 32 * 1024;
/// Most headers accepted in one request; more is 431.
pub const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Other,
}

/// A parsed request head. Header values that a handler may forward
/// upstream are kept as raw slices.
#[derive(Debug)]
pub struct Request<'a> {
    pub method: Method,
    pub method_raw: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    /// Query string without the '?', if any.
    pub query: Option<&'a str>,
    /// The request target exactly as sent (path and query).
    pub target: &'a str,
    pub http10: bool,
    /// Whether the client wants the connection kept open after this response.
    pub keep_alive: bool,
    /// The request carries a body (Content-Length > 0 or Transfer-Encoding);
    /// ncro serves a read-only cache and refuses bodies.
    pub has_body: bool,
    pub range: Option<&'a [u8]>,
    pub if_range: Option<&'a [u8]>,
    pub if_none_match: Option<&'a [u8]>,
    pub if_modified_since: Option<&'a [u8]>,
}

#[derive(Debug)]
pub enum Parse<'a> {
    /// A complete head of `len` bytes.
    Complete(Request<'a>, usize),
    /// More bytes are needed.
    Partial,
    /// 400: the bytes are not an HTTP/1.x request.
    Bad(&'static str),
    /// 431: the head or its header count is over the limit.
    TooLarge,
}

pub fn parse(buf: &[u8]) -> Parse<'_> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_HEAD {
                Parse::TooLarge
            } else {
                Parse::Partial
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Parse::TooLarge,
        Err(_) => return Parse::Bad("malformed request"),
    };
    if len > MAX_HEAD {
        return Parse::TooLarge;
    }
    let (Some(method_raw), Some(target), Some(version)) = (req.method, req.path, req.version)
    else {
        return Parse::Bad("malformed request");
    };
    let method = match method_raw {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => Method::Other,
    };
    let http10 = version == 0;
    let mut r = Request {
        method,
        method_raw,
        path: target,
        query: None,
        target,
        http10,
        keep_alive: !http10,
        has_body: false,
        range: None,
        if_range: None,
        if_none_match: None,
        if_modified_since: None,
    };
    if let Some((p, q)) = target.split_once('?') {
        r.path = p;
        r.query = Some(q);
    }
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        // Dispatch on length first: cheaper than comparing every name.
        match name.len() {
            10 if name.eq_ignore_ascii_case(b"connection") => apply_connection(&mut r, h.value),
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                let v = h.value;
                if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                    return Parse::Bad("invalid Content-Length");
                }
                if v.iter().any(|&b| b != b'0') {
                    r.has_body = true;
                }
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => r.has_body = true,
            5 if name.eq_ignore_ascii_case(b"range") => r.range = Some(h.value),
            8 if name.eq_ignore_ascii_case(b"if-range") => r.if_range = Some(h.value),
            13 if name.eq_ignore_ascii_case(b"if-none-match") => r.if_none_match = Some(h.value),
            17 if name.eq_ignore_ascii_case(b"if-modified-since") => {
                r.if_modified_since = Some(h.value)
            }
            _ => {}
        }
    }
    Parse::Complete(r, len)
}

fn apply_connection(r: &mut Request<'_>, value: &[u8]) {
    for token in value.split(|&b| b == b',') {
        let t = token.trim_ascii();
        if t.eq_ignore_ascii_case(b"close") {
            r.keep_alive = false;
        } else if t.eq_ignore_ascii_case(b"keep-alive") && r.http10 {
            r.keep_alive = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> (Request<'_>, usize) {
        match parse(buf) {
            Parse::Complete(r, n) => (r, n),
            other => panic!("not complete: {other:?}"),
        }
    }

    #[test]
    fn parses_get_with_query_and_range() {
        let raw =
            b"GET /nar/abc.nar.xz?hash=x HTTP/1.1\r\nHost: h\r\nRange: bytes=10-\r\n\r\nGET /";
        let (r, n) = complete(raw);
        assert_eq!(n, raw.len() - 5);
        assert_eq!(
            (r.method, r.path, r.query, r.target),
            (
                Method::Get,
                "/nar/abc.nar.xz",
                Some("hash=x"),
                "/nar/abc.nar.xz?hash=x"
            )
        );
        assert_eq!(r.range, Some(&b"bytes=10-"[..]));
        assert!(r.keep_alive && !r.has_body);
    }

    #[test]
    fn connection_semantics() {
        assert!(
            !complete(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(!complete(b"GET / HTTP/1.0\r\n\r\n").0.keep_alive);
        assert!(
            complete(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(
            !complete(b"GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n")
                .0
                .keep_alive
        );
    }

    #[test]
    fn limits_and_errors() {
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: x"),
            Parse::Partial
        ));
        assert!(matches!(parse(b"\x00\x01garbage\r\n\r\n"), Parse::Bad(_)));
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert!(matches!(parse(&big), Parse::TooLarge));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..(MAX_HEADERS + 1) {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(parse(&many), Parse::TooLarge));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Parse::Bad(_)
        ));
        assert!(
            complete(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n")
                .0
                .has_body
        );
        assert!(
            !complete(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
                .0
                .has_body
        );
        assert_eq!(complete(b"BREW / HTTP/1.1\r\n\r\n").0.method, Method::Other);
    }
}
