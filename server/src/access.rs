//! Who may do what. Keys grant scopes (checked by the HTTP layer, `api::auth`); the tuning
//! store records the scope that created each adapter and job, and the tuner checks it.
//!
//! Scopes are ordered: `inference` < `tune` < `admin`.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Inference,
    Tune,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Inference => "inference",
            Scope::Tune => "tune",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Scope::Inference, Scope::Tune, Scope::Admin].into_iter().find(|s| s.as_str() == text)
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
