//! A dynamic library that is not a Tessera plugin: it exports no `tessera_plugin_root`.

#[no_mangle]
pub extern "C" fn something_else() -> u32 {
    // The ABI crate is linked only so the library is built like a plugin.
    tessera_plugin_api::ABI_VERSION
}
