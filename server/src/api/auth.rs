//! Keys and their scopes, and the route layer that checks them. Each route group declares the
//! scope it needs where the router is built (`api::api_routes`); nothing here looks at paths.
//!
//! Scopes are ordered: `inference` (chat, completions, models, tokenize) < `tune` (also
//! feedback, files, fine-tuning jobs and training) < `admin` (everything). A key opens the routes
//! of its scope and below. Keys are held as sha256 digests and compared in constant time.
//!
//! Without any key the server is open. Without an `inference` key, the inference routes are
//! open (a server may guard only its admin routes). A route whose scope no configured key
//! reaches takes the highest key there is (a server with only `--api-key` asks that key
//! everywhere).

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{App, AppError};

pub use crate::access::Scope;

/// What a request may do: the scope its key grants on the route it called (the route's own
/// scope where a lower key stands in for a scope nobody holds). Handlers read it to check
/// ownership of the resources they touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal(pub Scope);

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}:{line}: {reason} (expected `<inference|tune|admin> <sha256 of the key, 64 hex digits>`)")]
    Line { path: String, line: usize, reason: String },
}

/// The keys a server accepts, by the sha256 digest of each and its scope.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    digests: Vec<(Scope, [u8; 32])>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Keys {
    /// Adds a key given in clear (a flag or environment variable).
    pub fn with_key(mut self, scope: Scope, key: Option<&str>) -> Self {
        if let Some(key) = key.filter(|k| !k.is_empty()) {
            self.digests.push((scope, digest(key)));
        }
        self
    }

    /// Adds the keys of a keys file: one `<scope> <sha256 hex>` a line; `#` starts a comment.
    /// Only digests are stored, so the file holds no key itself
    /// (`printf %s "$KEY" | sha256sum` makes a line's digest).
    pub fn with_file(mut self, path: &Path) -> Result<Self, KeysError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Io { path: shown.clone(), source })?;
        for (i, line) in text.lines().enumerate() {
            let line_error = |reason: &str| KeysError::Line { path: shown.clone(), line: i + 1, reason: reason.into() };
            let content = line.split('#').next().unwrap_or_default().trim();
            if content.is_empty() {
                continue;
            }
            let (scope, hex) = content.split_once(char::is_whitespace).ok_or_else(|| line_error("two fields are needed"))?;
            let scope = Scope::parse(scope).ok_or_else(|| line_error("unknown scope"))?;
            let hex = hex.trim();
            if hex.len() != 64 {
                return Err(line_error("the digest is not 64 hex digits"));
            }
            let mut bytes = [0u8; 32];
            for (byte, pair) in bytes.iter_mut().zip(hex.as_bytes().chunks(2)) {
                let pair = std::str::from_utf8(pair).map_err(|_| line_error("the digest is not hex"))?;
                *byte = u8::from_str_radix(pair, 16).map_err(|_| line_error("the digest is not hex"))?;
            }
            self.digests.push((scope, bytes));
        }
        Ok(self)
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The scope of `presented`, comparing it with every key in constant time.
    fn scope_of(&self, presented: Option<&str>) -> Option<Scope> {
        let presented = digest(presented?);
        self.digests
            .iter()
            .filter(|(_, d)| bool::from(d.ct_eq(&presented)))
            .map(|(scope, _)| *scope)
            .max()
    }

    fn holds(&self, scope: Scope) -> bool {
        self.digests.iter().any(|(s, _)| *s == scope)
    }

    fn highest(&self) -> Option<Scope> {
        self.digests.iter().map(|(scope, _)| *scope).max()
    }

    /// Who `presented` is on a route that needs `needed`, or the error to answer.
    pub fn authorize(&self, needed: Scope, presented: Option<&str>) -> Result<Principal, AppError> {
        let Some(highest) = self.highest() else {
            return Ok(Principal(Scope::Admin));
        };
        match self.scope_of(presented) {
            Some(scope) if scope >= needed => Ok(Principal(scope)),
            // Nobody holds the needed scope: the highest key stands in for it.
            Some(scope) if scope == highest => Ok(Principal(needed)),
            Some(_) => Err(AppError::InsufficientScope(needed.as_str())),
            None if needed == Scope::Inference && !self.holds(Scope::Inference) => Ok(Principal(Scope::Inference)),
            None => Err(AppError::Unauthorized),
        }
    }
}

impl Keys {
    /// The highest scope `presented` opens (with the stand-ins of [`Keys::authorize`]), or
    /// `None` when it opens nothing.
    pub fn effective_scope(&self, presented: Option<&str>) -> Option<Scope> {
        [Scope::Admin, Scope::Tune, Scope::Inference].into_iter().find(|&scope| self.authorize(scope, presented).is_ok())
    }
}

/// The key of `Authorization: Bearer <key>`; the scheme's case does not matter (RFC 9110).
pub fn bearer_key(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim_start();
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

fn bearer(request: &Request) -> Option<&str> {
    bearer_key(request.headers())
}


/// The route layer of a route group that needs `needed`: checks the key and hands the
/// handlers its [`Principal`].
pub async fn require(State((app, needed)): State<(Arc<App>, Scope)>, mut request: Request, next: Next) -> Response {
    match app.settings.keys.authorize(needed, bearer(&request)) {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::default()
            .with_key(Scope::Inference, Some("user"))
            .with_key(Scope::Tune, Some("tuner"))
            .with_key(Scope::Admin, Some("root"))
    }

    #[test]
    fn each_key_opens_its_scope_and_below() {
        let k = keys();
        assert_eq!(k.authorize(Scope::Inference, Some("user")).unwrap(), Principal(Scope::Inference));
        assert_eq!(k.authorize(Scope::Inference, Some("root")).unwrap(), Principal(Scope::Admin));
        assert_eq!(k.authorize(Scope::Tune, Some("tuner")).unwrap(), Principal(Scope::Tune));
        assert!(matches!(k.authorize(Scope::Tune, Some("user")), Err(AppError::InsufficientScope("tune"))));
        assert!(matches!(k.authorize(Scope::Admin, Some("tuner")), Err(AppError::InsufficientScope("admin"))));
        assert!(matches!(k.authorize(Scope::Inference, Some("nope")), Err(AppError::Unauthorized)));
        assert!(matches!(k.authorize(Scope::Inference, None), Err(AppError::Unauthorized)));
    }

    #[test]
    fn without_keys_the_server_is_open_and_a_lone_key_stands_in_for_the_rest() {
        assert_eq!(Keys::default().authorize(Scope::Admin, None).unwrap(), Principal(Scope::Admin));
        let only_api = Keys::default().with_key(Scope::Inference, Some("user"));
        assert_eq!(only_api.authorize(Scope::Admin, Some("user")).unwrap(), Principal(Scope::Admin));
        assert!(matches!(only_api.authorize(Scope::Admin, None), Err(AppError::Unauthorized)));
        // Only an admin key: inference stays open, tuning and admin need that key.
        let only_admin = Keys::default().with_key(Scope::Admin, Some("root"));
        assert_eq!(only_admin.authorize(Scope::Inference, None).unwrap(), Principal(Scope::Inference));
        assert!(matches!(only_admin.authorize(Scope::Tune, None), Err(AppError::Unauthorized)));
        assert_eq!(only_admin.authorize(Scope::Tune, Some("root")).unwrap(), Principal(Scope::Admin));
    }

    #[test]
    fn the_effective_scope_is_the_highest_a_key_opens() {
        assert_eq!(Keys::default().effective_scope(None), Some(Scope::Admin));
        assert_eq!(keys().effective_scope(Some("tuner")), Some(Scope::Tune));
        assert_eq!(keys().effective_scope(Some("wrong")), None);
        assert_eq!(keys().effective_scope(None), None);
        let only_api = Keys::default().with_key(Scope::Inference, Some("user"));
        assert_eq!(only_api.effective_scope(Some("user")), Some(Scope::Admin), "a lone key stands in for every scope");
        let only_admin = Keys::default().with_key(Scope::Admin, Some("root"));
        assert_eq!(only_admin.effective_scope(None), Some(Scope::Inference), "inference stays open");
    }

    #[test]
    fn keys_files_hold_digests_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let tuner_digest: String = digest("tuner").iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&path, format!("# team keys\ntune {tuner_digest}  # the data team\n\n")).unwrap();
        let k = Keys::default().with_file(&path).unwrap();
        assert_eq!(k.authorize(Scope::Tune, Some("tuner")).unwrap(), Principal(Scope::Tune));
        std::fs::write(&path, "owner abc\n").unwrap();
        let err = Keys::default().with_file(&path).unwrap_err().to_string();
        assert!(err.contains(":1: unknown scope"), "{err}");
        std::fs::write(&path, "tune abc\n").unwrap();
        assert!(Keys::default().with_file(&path).unwrap_err().to_string().contains("64 hex digits"));
    }
}
