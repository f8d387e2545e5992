//! The ABI between Tessera and its domain plugins.
//!
//! A plugin is a `cdylib` exporting one symbol, [`ROOT_SYMBOL`], a function returning a pointer to
//! a `#[repr(C)]` [`PluginRoot`]: a magic value and an ABI version, which the host checks before
//! anything else, then `extern "C"` functions. Only `#[repr(C)]` types and `extern "C"` functions
//! cross the boundary; the payloads are UTF-8 JSON (the serde types below).
//!
//! Ownership: input bytes are the host's, borrowed for the call. Output bytes are allocated by
//! the plugin and handed back to the plugin's own `free_bytes`: whichever side allocates frees.
//! No panic crosses the boundary: [`export_plugin!`] wraps every function in `catch_unwind` and
//! returns [`STATUS_PANIC`] instead.

use serde::{Deserialize, Serialize};

/// "TESSERA\x01": first field of every root.
pub const MAGIC: u64 = 0x5445_5353_4552_4101;
/// Bumped on any change to [`PluginRoot`] or the payloads' meaning.
///
/// - 1: the hooks.
/// - 2: [`PluginInfo::answer`], the shape of the plugin's answers. The root is unchanged, so a
///   host of version 2 loads plugins of version 1 (which declare no shape).
pub const ABI_VERSION: u32 = 2;
/// The oldest version a host of this version still loads.
pub const MIN_ABI_VERSION: u32 = 1;
/// The exported symbol: `extern "C" fn() -> *const PluginRoot`.
pub const ROOT_SYMBOL: &[u8] = b"tessera_plugin_root\0";

/// A call's outcome.
pub type Status = i32;
/// The output holds the JSON answer.
pub const STATUS_OK: Status = 0;
/// The output holds a UTF-8 message about the input (the caller's error, not the plugin's).
pub const STATUS_ERROR: Status = 1;
/// The plugin panicked; the output holds the panic message if it could be formatted.
pub const STATUS_PANIC: Status = 2;

/// Bytes borrowed from the caller for the duration of a call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct InputBytes {
    pub ptr: *const u8,
    pub len: usize,
}

/// Bytes allocated by the plugin; the host returns them through `free_bytes`.
#[repr(C)]
pub struct OutputBytes {
    pub ptr: *mut u8,
    pub len: usize,
    pub capacity: usize,
}

impl OutputBytes {
    pub const EMPTY: OutputBytes = OutputBytes {
        ptr: std::ptr::null_mut(),
        len: 0,
        capacity: 0,
    };
}

pub type InfoFn = unsafe extern "C" fn(output: *mut OutputBytes) -> Status;
pub type HookFn = unsafe extern "C" fn(input: InputBytes, output: *mut OutputBytes) -> Status;
pub type FreeFn = unsafe extern "C" fn(bytes: OutputBytes);

/// What a plugin exports.
#[repr(C)]
pub struct PluginRoot {
    pub magic: u64,
    pub abi_version: u32,
    /// → [`PluginInfo`].
    pub info: InfoFn,
    /// [`RewriteRequest`] → [`RewriteResponse`]: the messages before templating.
    pub rewrite_request: HookFn,
    /// [`CheckRequest`] → [`CheckResponse`]: validate or normalise the answer.
    pub check_response: HookFn,
    /// [`ConvertRequest`] → [`ConvertResponse`]: a domain record to instruction pairs.
    pub convert_feedback: HookFn,
    /// [`AdapterFileRequest`] → the file's raw bytes (embedded adapters).
    pub adapter_file: HookFn,
    pub free_bytes: FreeFn,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

/// Where an adapter's weights come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AdapterSource {
    /// A PEFT folder shipped beside the library (relative to the library's folder).
    Files { dir: String },
    /// `adapter_config.json` and `adapter_model.safetensors` inside the library, served by
    /// `adapter_file`.
    Embedded,
    /// Tuned online by the server from the domain's feedback (created fresh if new).
    Tuned,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterSpec {
    /// The adapter's name in the server's registry.
    pub name: String,
    /// Its default weight in the mix.
    pub scale: f32,
    pub source: AdapterSource,
}

/// The shape every answer of a plugin has; the server enforces it while decoding and checks
/// feedback against it (ABI 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AnswerConstraint {
    /// A JSON value valid under this JSON Schema.
    JsonSchema { schema: serde_json::Value },
    /// Exactly one of these strings.
    Choice { choices: Vec<String> },
    /// A whole-answer match of this regular expression.
    Regex { pattern: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginInfo {
    /// Also the `model` clients use.
    pub name: String,
    pub version: String,
    pub description: String,
    /// Prepended as the system message when the rewritten messages have none.
    pub system_prompt: Option<String>,
    pub adapters: Vec<AdapterSpec>,
    /// The shape of every answer (absent from version-1 plugins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<AnswerConstraint>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewriteRequest {
    pub messages: Vec<Message>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewriteResponse {
    pub messages: Vec<Message>,
    /// This request's answer shape, narrower than [`PluginInfo::answer`] (ABI 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<AnswerConstraint>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckRequest {
    /// The messages as the model saw them (after the rewrite).
    pub messages: Vec<Message>,
    pub answer: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResponse {
    /// The answer to return (normalised or repaired).
    pub answer: String,
    /// Whether the model's own answer was already valid.
    pub valid: bool,
    /// Why it was changed, when it was.
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvertRequest {
    pub record: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvertResponse {
    pub conversations: Vec<Conversation>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterFileRequest {
    pub adapter: String,
    pub file: String,
}

/// What a plugin implements, in safe Rust; [`export_plugin!`] turns it into the C ABI.
pub trait DomainPlugin: Send + Sync + 'static {
    fn info(&self) -> PluginInfo;

    /// The messages as the client sent them → the messages the model sees.
    fn rewrite_request(&self, messages: Vec<Message>) -> Result<Vec<Message>, String> {
        Ok(messages)
    }

    /// The shape of the answer to these (rewritten) messages, when narrower than the one in
    /// [`PluginInfo::answer`]: for example the exact fields an extraction asks for.
    fn answer_shape(&self, messages: &[Message]) -> Option<AnswerConstraint> {
        let _ = messages;
        None
    }

    fn check_response(&self, messages: &[Message], answer: &str) -> Result<CheckResponse, String> {
        let _ = messages;
        Ok(CheckResponse {
            answer: answer.to_string(),
            valid: true,
            note: None,
        })
    }

    /// One record of the domain's own format → instruction pairs.
    fn convert_feedback(&self, record: &serde_json::Value) -> Result<Vec<Conversation>, String>;

    /// The bytes of an embedded adapter's file.
    fn adapter_file(&self, adapter: &str, file: &str) -> Option<&'static [u8]> {
        let _ = (adapter, file);
        None
    }
}

/// Plugin-side plumbing used by [`export_plugin!`]; not for hosts.
pub mod export {
    use super::*;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    fn write(output: *mut OutputBytes, bytes: Vec<u8>) {
        let mut bytes = std::mem::ManuallyDrop::new(bytes);
        if !output.is_null() {
            // SAFETY: the host passes a valid, writable OutputBytes.
            unsafe {
                *output = OutputBytes {
                    ptr: bytes.as_mut_ptr(),
                    len: bytes.len(),
                    capacity: bytes.capacity(),
                };
            }
        } else {
            // Nowhere to hand it: free it here.
            unsafe { drop(std::mem::ManuallyDrop::take(&mut bytes)) };
        }
    }

    fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "the plugin panicked".into())
    }

    /// Runs `f` with the input, catching panics; writes the answer or the message.
    pub fn call(input: Option<InputBytes>, output: *mut OutputBytes, f: impl FnOnce(&[u8]) -> Result<Vec<u8>, String>) -> Status {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let bytes: &[u8] = match input {
                // SAFETY: the host lends `len` readable bytes at `ptr` for this call.
                Some(i) if !i.ptr.is_null() => unsafe { std::slice::from_raw_parts(i.ptr, i.len) },
                _ => &[],
            };
            f(bytes)
        }));
        match outcome {
            Ok(Ok(bytes)) => {
                write(output, bytes);
                STATUS_OK
            }
            Ok(Err(message)) => {
                write(output, message.into_bytes());
                STATUS_ERROR
            }
            Err(payload) => {
                let message = catch_unwind(AssertUnwindSafe(|| panic_message(&*payload))).unwrap_or_default();
                // Dropping the payload could itself panic: leak it instead.
                std::mem::forget(payload);
                write(output, message.into_bytes());
                STATUS_PANIC
            }
        }
    }

    /// JSON in, JSON out.
    pub fn json<I: serde::de::DeserializeOwned, O: Serialize>(bytes: &[u8], f: impl FnOnce(I) -> Result<O, String>) -> Result<Vec<u8>, String> {
        let input: I = serde_json::from_slice(bytes).map_err(|e| format!("bad input: {e}"))?;
        serde_json::to_vec(&f(input)?).map_err(|e| e.to_string())
    }

    /// Frees bytes this plugin allocated.
    pub fn free(bytes: OutputBytes) {
        if !bytes.ptr.is_null() {
            // SAFETY: ptr/len/capacity came from a Vec<u8> of this library's allocator (`write`).
            let _ = catch_unwind(|| unsafe { drop(Vec::from_raw_parts(bytes.ptr, bytes.len, bytes.capacity)) });
        }
    }
}

/// Exports `$plugin` (a `DomainPlugin` built by `$make`) as a Tessera plugin.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty, $make:expr) => {
        fn __tessera_plugin() -> &'static $plugin {
            static PLUGIN: ::std::sync::OnceLock<$plugin> = ::std::sync::OnceLock::new();
            PLUGIN.get_or_init(|| $make)
        }

        unsafe extern "C" fn __tessera_info(output: *mut $crate::OutputBytes) -> $crate::Status {
            $crate::export::call(None, output, |_| {
                serde_json::to_vec(&$crate::DomainPlugin::info(__tessera_plugin())).map_err(|e| e.to_string())
            })
        }

        unsafe extern "C" fn __tessera_rewrite(input: $crate::InputBytes, output: *mut $crate::OutputBytes) -> $crate::Status {
            $crate::export::call(Some(input), output, |bytes| {
                $crate::export::json(bytes, |r: $crate::RewriteRequest| {
                    $crate::DomainPlugin::rewrite_request(__tessera_plugin(), r.messages).map(|messages| $crate::RewriteResponse {
                        answer: $crate::DomainPlugin::answer_shape(__tessera_plugin(), &messages),
                        messages,
                    })
                })
            })
        }

        unsafe extern "C" fn __tessera_check(input: $crate::InputBytes, output: *mut $crate::OutputBytes) -> $crate::Status {
            $crate::export::call(Some(input), output, |bytes| {
                $crate::export::json(bytes, |r: $crate::CheckRequest| {
                    $crate::DomainPlugin::check_response(__tessera_plugin(), &r.messages, &r.answer)
                })
            })
        }

        unsafe extern "C" fn __tessera_convert(input: $crate::InputBytes, output: *mut $crate::OutputBytes) -> $crate::Status {
            $crate::export::call(Some(input), output, |bytes| {
                $crate::export::json(bytes, |r: $crate::ConvertRequest| {
                    $crate::DomainPlugin::convert_feedback(__tessera_plugin(), &r.record)
                        .map(|conversations| $crate::ConvertResponse { conversations })
                })
            })
        }

        unsafe extern "C" fn __tessera_adapter_file(input: $crate::InputBytes, output: *mut $crate::OutputBytes) -> $crate::Status {
            $crate::export::call(Some(input), output, |bytes| {
                let r: $crate::AdapterFileRequest = serde_json::from_slice(bytes).map_err(|e| format!("bad input: {e}"))?;
                $crate::DomainPlugin::adapter_file(__tessera_plugin(), &r.adapter, &r.file)
                    .map(|b| b.to_vec())
                    .ok_or_else(|| format!("no embedded file `{}` for adapter `{}`", r.file, r.adapter))
            })
        }

        unsafe extern "C" fn __tessera_free(bytes: $crate::OutputBytes) {
            $crate::export::free(bytes)
        }

        static __TESSERA_ROOT: $crate::PluginRoot = $crate::PluginRoot {
            magic: $crate::MAGIC,
            abi_version: $crate::ABI_VERSION,
            info: __tessera_info,
            rewrite_request: __tessera_rewrite,
            check_response: __tessera_check,
            convert_feedback: __tessera_convert,
            adapter_file: __tessera_adapter_file,
            free_bytes: __tessera_free,
        };

        #[no_mangle]
        pub extern "C" fn tessera_plugin_root() -> *const $crate::PluginRoot {
            &__TESSERA_ROOT
        }
    };
}

/// The text of the last user message.
pub fn last_user_text(messages: &[Message]) -> Option<&str> {
    messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.as_str())
}
