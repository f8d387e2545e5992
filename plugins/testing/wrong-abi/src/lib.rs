//! A plugin built against a different ABI version: the server must refuse it before calling
//! anything.

use tessera_plugin_api::{InputBytes, OutputBytes, PluginRoot, Status, MAGIC, STATUS_PANIC};

unsafe extern "C" fn never_called(_output: *mut OutputBytes) -> Status {
    STATUS_PANIC
}

unsafe extern "C" fn never_called_hook(_input: InputBytes, _output: *mut OutputBytes) -> Status {
    STATUS_PANIC
}

unsafe extern "C" fn free_nothing(_bytes: OutputBytes) {}

static ROOT: PluginRoot = PluginRoot {
    magic: MAGIC,
    abi_version: 999,
    info: never_called,
    rewrite_request: never_called_hook,
    check_response: never_called_hook,
    convert_feedback: never_called_hook,
    adapter_file: never_called_hook,
    free_bytes: free_nothing,
};

#[no_mangle]
pub extern "C" fn tessera_plugin_root() -> *const PluginRoot {
    &ROOT
}
