//! The root module every plugin exports, and the [`export_consumer!`] macro that writes it.

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{RResult, RStr, RString},
    StableAbi,
};

use crate::{consumer::ConsumerBox, log::Host};

/// Version of the plugin contract. It changes whenever a change to this crate would make an
/// already-built plugin misbehave; the router refuses plugins built against another one.
pub const CONTRACT_VERSION: u32 = 2;

/// The root module of a consumer plugin.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// [`CONTRACT_VERSION`] of the plugin-api the plugin was built against.
    pub contract_version: u32,
    /// The plugin's name (`datadog`, `perfdata`, ...).
    pub plugin_name: RStr<'static>,
    /// The plugin's own version.
    pub plugin_version: RStr<'static>,
    /// Builds consumer `consumer` (its name in the configuration) from the plugin's
    /// configuration table, given as TOML text, with the router's services (its log). It
    /// checks the settings and starts nothing (see [`crate::ConsumerPlugin::start`]). The
    /// error says which key and value were wrong.
    #[sabi(last_prefix_field)]
    pub new_consumer: extern "C" fn(
        consumer: RStr<'_>,
        config_toml: RStr<'_>,
        host: Host,
    ) -> RResult<ConsumerBox, RString>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "consumer_plugin";
    const NAME: &'static str = "profile router consumer plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// Exports a consumer plugin's root module.
///
/// `constructor` is a `fn(&str) -> Result<T, PluginError>` that receives the plugin's TOML
/// table as text and starts nothing; `T` implements [`crate::ConsumerPlugin`]. Panics in the
/// constructor and in every consumer call are caught and reported to the router as errors.
///
/// ```ignore
/// plugin_api::export_consumer! {
///     name: "jsonl",
///     version: env!("CARGO_PKG_VERSION"),
///     constructor: JsonlConsumer::from_toml,
/// }
/// ```
#[macro_export]
macro_rules! export_consumer {
    (name: $name:expr, version: $version:expr, constructor: $ctor:expr $(,)?) => {
        $crate::export_consumer! {
            @contract $crate::CONTRACT_VERSION, name: $name, version: $version, constructor: $ctor
        }
    };
    (@contract $contract:expr, name: $name:expr, version: $version:expr, constructor: $ctor:expr $(,)?) => {
        // What `#[abi_stable::export_root_module]` generates, spelled through `$crate` so that
        // plugins need no direct dependency on abi_stable. The symbol name is abi_stable's
        // `ROOT_MODULE_LOADER_NAME` (a test in plugin-api checks that they agree).
        /// The plugin's root module header, read by the router when it loads the file.
        #[no_mangle]
        #[allow(non_upper_case_globals)]
        pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::abi_stable::library::LibHeader = {
            extern "C" fn erased_loader() -> $crate::abi_stable::library::RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader(__consumer_plugin_root_module)
            }
            // SAFETY: the constructor returns the root module of type `PluginModuleRef`.
            unsafe {
                $crate::abi_stable::library::LibHeader::from_constructor::<$crate::PluginModuleRef>(
                    erased_loader,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            }
        };

        fn __consumer_plugin_root_module() -> $crate::PluginModuleRef {
            use $crate::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::PluginModule {
                contract_version: $contract,
                plugin_name: $crate::abi_stable::std_types::RStr::from_str($name),
                plugin_version: $crate::abi_stable::std_types::RStr::from_str($version),
                new_consumer: __consumer_plugin_new,
            }
            .leak_into_prefix()
        }

        extern "C" fn __consumer_plugin_new(
            consumer: $crate::abi_stable::std_types::RStr<'_>,
            config_toml: $crate::abi_stable::std_types::RStr<'_>,
            host: $crate::log::Host,
        ) -> $crate::abi_stable::std_types::RResult<
            $crate::consumer::ConsumerBox,
            $crate::abi_stable::std_types::RString,
        > {
            $crate::log::connect(host, $name);
            let consumer: ::std::sync::Arc<str> = consumer.as_str().into();
            $crate::log::as_consumer(&consumer.clone(), || {
                $crate::consumer::guard("constructor", || {
                    let plugin = ($ctor)(config_toml.as_str())?;
                    Ok($crate::consumer::Consumer_TO::from_value(
                        $crate::consumer::PanicGuard::new(plugin, consumer),
                        $crate::abi_stable::sabi_trait::TD_Opaque,
                    ))
                })
            })
        }
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn export_macro_uses_abi_stables_loader_symbol() {
        assert_eq!(
            abi_stable::library::ROOT_MODULE_LOADER_NAME,
            "_1as_0lib_1header_0root_bmodule_bloader"
        );
    }
}
