//! Hand-written HTTP/1.1 on httparse, for both sides of the proxy.
//! Why not monoio-http: see docs/architecture.md.

pub mod chunked;
pub mod client;
pub mod request;
pub mod resolve;
pub mod response;
pub mod tls;
