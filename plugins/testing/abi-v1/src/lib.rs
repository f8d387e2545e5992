//! A plugin exactly as ABI version 1 wrote it: version 1 in its root, and payloads without
//! version 2's fields (`answer` in the info and in the rewrite's response). A version-2 server
//! must still load and serve it, unconstrained.

use tessera_plugin_api::export::{call, free};
use tessera_plugin_api::{InputBytes, OutputBytes, PluginRoot, Status, MAGIC};

unsafe extern "C" fn info(output: *mut OutputBytes) -> Status {
    call(None, output, |_| {
        Ok(br#"{"name": "old", "version": "0.9.0", "description": "Built for ABI 1", "system_prompt": null, "adapters": []}"#.to_vec())
    })
}

/// Passes the messages through, answering in version 1's shape.
unsafe extern "C" fn rewrite(input: InputBytes, output: *mut OutputBytes) -> Status {
    call(Some(input), output, |bytes| {
        let request: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        Ok(serde_json::json!({"messages": request["messages"]}).to_string().into_bytes())
    })
}

unsafe extern "C" fn check(input: InputBytes, output: *mut OutputBytes) -> Status {
    call(Some(input), output, |bytes| {
        let request: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        Ok(serde_json::json!({"answer": request["answer"], "valid": true, "note": null}).to_string().into_bytes())
    })
}

unsafe extern "C" fn refuse(input: InputBytes, output: *mut OutputBytes) -> Status {
    call(Some(input), output, |_| Err("this plugin takes no feedback and ships no files".into()))
}

unsafe extern "C" fn free_bytes(bytes: OutputBytes) {
    free(bytes)
}

static ROOT: PluginRoot = PluginRoot {
    magic: MAGIC,
    abi_version: 1,
    info,
    rewrite_request: rewrite,
    check_response: check,
    convert_feedback: refuse,
    adapter_file: refuse,
    free_bytes,
};

#[no_mangle]
pub extern "C" fn tessera_plugin_root() -> *const PluginRoot {
    &ROOT
}
