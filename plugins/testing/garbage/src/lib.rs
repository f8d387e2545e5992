//! A plugin with valid metadata whose hooks answer "OK" with bytes that are not JSON: the server
//! must mark it failed, not trust the output.

use tessera_plugin_api::{InputBytes, OutputBytes, PluginRoot, Status, ABI_VERSION, MAGIC, STATUS_OK};

fn hand_over(bytes: &'static [u8], output: *mut OutputBytes) -> Status {
    let mut owned = std::mem::ManuallyDrop::new(bytes.to_vec());
    // SAFETY: the host passes a valid, writable OutputBytes.
    unsafe {
        *output = OutputBytes {
            ptr: owned.as_mut_ptr(),
            len: owned.len(),
            capacity: owned.capacity(),
        };
    }
    STATUS_OK
}

unsafe extern "C" fn info(output: *mut OutputBytes) -> Status {
    hand_over(
        br#"{"name": "garbage", "version": "0.0.1", "description": "returns garbage", "system_prompt": null, "adapters": []}"#,
        output,
    )
}

unsafe extern "C" fn garbage(_input: InputBytes, output: *mut OutputBytes) -> Status {
    hand_over(b"\xff\xfe this is not JSON", output)
}

unsafe extern "C" fn free_bytes(bytes: OutputBytes) {
    if !bytes.ptr.is_null() {
        // SAFETY: allocated by `hand_over` as a Vec<u8> of this library.
        drop(Vec::from_raw_parts(bytes.ptr, bytes.len, bytes.capacity));
    }
}

static ROOT: PluginRoot = PluginRoot {
    magic: MAGIC,
    abi_version: ABI_VERSION,
    info,
    rewrite_request: garbage,
    check_response: garbage,
    convert_feedback: garbage,
    adapter_file: garbage,
    free_bytes,
};

#[no_mangle]
pub extern "C" fn tessera_plugin_root() -> *const PluginRoot {
    &ROOT
}
