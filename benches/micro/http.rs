//! `http::request::parse` (httparse plus the fields ncro's handlers read)
//! against httparse alone on the same head, as the Nix client sends it.

use divan::black_box;
use ncro::http::request::{parse, Parse, MAX_HEADERS};

const HEAD: &[u8] = b"GET /0a9fs7dmj5x1ahq4xwpc9iv6hdq6h9lh.narinfo HTTP/1.1\r\n\
Host: ncro:8080\r\n\
User-Agent: curl/8.7.1 Nix/2.24.10\r\n\
Accept: */*\r\n\r\n";

#[divan::bench(sample_size = 1000)]
fn ncro() -> usize {
    match parse(black_box(HEAD)) {
        Parse::Complete(req, len) => len + req.path.len(),
        other => panic!("sample head did not parse: {other:?}"),
    }
}

#[divan::bench(sample_size = 1000)]
fn baseline_httparse() -> usize {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(black_box(HEAD)) {
        Ok(httparse::Status::Complete(len)) => len + req.path.map_or(0, str::len),
        other => panic!("sample head did not parse: {other:?}"),
    }
}
