//! Error responses of the keel layers: RFC 9457 problem details (`application/problem+json`)
//! by default, replaceable with a [`ProblemRenderer`].
//!
//! Every problem keel emits has `type: "about:blank"` (so `title` is the status's reason
//! phrase), a `detail` sentence saying what happened and what the client can do, and a stable
//! `code` extension member a client can branch on (`rate_limited`, `idempotency_key_in_use`,
//! ...), plus members specific to the problem (the violated `policy`, `retry_after`).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use serde_json::{Map, Value};

/// The media type of RFC 9457 problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// One problem to report to the client. Build with [`Problem::new`], then add members.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    status: StatusCode,
    code: &'static str,
    detail: String,
    headers: HeaderMap,
    members: Map<String, Value>,
}

impl Problem {
    /// A problem with `status`, a stable machine-readable `code` and a human `detail`.
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status,
            code,
            detail: detail.into(),
            headers: HeaderMap::new(),
            members: Map::new(),
        }
    }

    /// Adds an extension member to the document.
    pub fn with_member(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.members.insert(name.to_owned(), value.into());
        self
    }

    /// Adds a header to the response (e.g. `Retry-After`); renderers should keep them.
    pub fn with_header(mut self, name: http::HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code (`rate_limited`, `idempotency_key_invalid`, ...).
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The human-readable explanation.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// Headers the response must carry.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Extension members.
    pub fn members(&self) -> &Map<String, Value> {
        &self.members
    }

    /// The RFC 9457 JSON document.
    pub fn to_json(&self) -> Value {
        let mut doc = Map::new();
        doc.insert("type".into(), "about:blank".into());
        doc.insert(
            "title".into(),
            self.status.canonical_reason().unwrap_or("Error").into(),
        );
        doc.insert("status".into(), self.status.as_u16().into());
        doc.insert("detail".into(), self.detail.clone().into());
        doc.insert("code".into(), self.code.into());
        for (name, value) in &self.members {
            doc.entry(name.clone()).or_insert_with(|| value.clone());
        }
        Value::Object(doc)
    }
}

/// Turns a [`Problem`] into the response the client gets. The default is
/// [`ProblemJson`]; any `Fn(&Problem) -> Response<Bytes> + Send + Sync + 'static` is one.
pub trait ProblemRenderer: Send + Sync + 'static {
    /// The response for `problem`. Keep `problem.headers()` (e.g. `Retry-After`).
    fn render(&self, problem: &Problem) -> Response<Bytes>;
}

impl<F> ProblemRenderer for F
where
    F: Fn(&Problem) -> Response<Bytes> + Send + Sync + 'static,
{
    fn render(&self, problem: &Problem) -> Response<Bytes> {
        self(problem)
    }
}

/// The default renderer: `application/problem+json` with the problem's status and headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProblemJson;

impl ProblemRenderer for ProblemJson {
    fn render(&self, problem: &Problem) -> Response<Bytes> {
        // Serializing a `serde_json::Value` cannot fail (string keys, no custom serializers).
        let body = serde_json::to_vec(&problem.to_json()).unwrap_or_default();
        let mut response = Response::new(Bytes::from(body));
        *response.status_mut() = problem.status;
        let headers = response.headers_mut();
        for (name, value) in &problem.headers {
            headers.append(name, value.clone());
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        response
    }
}

/// A shared renderer, as the layers hold it.
pub(crate) type SharedRenderer = Arc<dyn ProblemRenderer>;

pub(crate) fn default_renderer() -> SharedRenderer {
    Arc::new(ProblemJson)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_json_has_the_rfc_members_and_headers() {
        let p = Problem::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "slow down")
            .with_member("policy", "api")
            .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("3"));
        let r = ProblemJson.render(&p);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(r.headers()[http::header::RETRY_AFTER], "3");
        let doc: Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(doc["type"], "about:blank");
        assert_eq!(doc["title"], "Too Many Requests");
        assert_eq!(doc["status"], 429);
        assert_eq!(doc["detail"], "slow down");
        assert_eq!(doc["code"], "rate_limited");
        assert_eq!(doc["policy"], "api");
    }
}
