//! The plugin host: finds, checks and loads consumer plugins, and builds their consumers.
//!
//! A plugin is loaded from a private, sealed copy of its file, and only after the path to it
//! is found trustworthy ([`trust`]) and the copy a whole shared object of this machine
//! ([`elf_check`]): a truncated file, or one overwritten in place while the router runs,
//! can then never crash it.

mod elf_check;
mod sealed_copy;
mod trust;

use std::{
    fs,
    io::{self, Read},
    path::{Path, PathBuf},
};

use abi_stable::{
    library::{lib_header_from_path, LibraryError},
    std_types::{RResult, RStr},
};
use plugin_api::{
    consumer::ConsumerBox,
    log::{Host, LogLevel},
    PluginModuleRef, CONTRACT_VERSION,
};

/// Why a plugin could not be loaded. Every message names the consumer and the file.
#[derive(Debug, thiserror::Error)]
pub enum PluginLoadError {
    /// The file is not there.
    #[error("consumer {consumer}: plugin file {path} not found ({reason})")]
    NotFound {
        /// The consumer's name.
        consumer: String,
        /// The file looked for.
        path: PathBuf,
        /// What the file system said.
        reason: String,
    },
    /// Users other than root and the router's own could change the file, or what the path
    /// leads to.
    #[error("consumer {consumer}: refusing plugin {path}: {reason}")]
    Insecure {
        /// The consumer's name.
        consumer: String,
        /// The file.
        path: PathBuf,
        /// Which path is at fault, and why.
        reason: trust::Untrusted,
    },
    /// Users other than root and the router's own could change `plugin_dir`.
    #[error("refusing plugin_dir {dir}: {reason}")]
    InsecurePluginDir {
        /// The plugin folder in force.
        dir: PathBuf,
        /// Which path is at fault, and why.
        reason: trust::Untrusted,
    },
    /// The file could not be read into a private copy.
    #[error("consumer {consumer}: cannot read plugin {path} into a private copy: {reason}")]
    Unreadable {
        /// The consumer's name.
        consumer: String,
        /// The file.
        path: PathBuf,
        /// What the system said.
        reason: io::Error,
    },
    /// The file is not a consumer plugin of this router.
    #[error("consumer {consumer}: {path} is not a usable consumer plugin: {reason}")]
    NotAPlugin {
        /// The consumer's name.
        consumer: String,
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The plugin was built against another contract version.
    #[error("consumer {consumer}: plugin {path} was built against plugin contract v{plugin}, but this router speaks contract v{router}; rebuild the plugin against this router's plugin-api")]
    ContractMismatch {
        /// The consumer's name.
        consumer: String,
        /// The file.
        path: PathBuf,
        /// The plugin's contract version.
        plugin: u32,
        /// The router's contract version.
        router: u32,
    },
    /// The plugin refused its configuration (or failed to start).
    #[error("consumer {consumer}: plugin {path} rejected its configuration: {reason}")]
    Rejected {
        /// The consumer's name.
        consumer: String,
        /// The file.
        path: PathBuf,
        /// The plugin's own message.
        reason: String,
    },
}

/// A consumer built by a loaded plugin.
pub struct LoadedConsumer {
    /// The consumer's name in the configuration.
    pub name: String,
    /// The plugin file.
    pub path: PathBuf,
    /// The plugin's own name and version.
    pub plugin_name: String,
    /// The plugin's own version.
    pub plugin_version: String,
    /// The consumer.
    pub consumer: ConsumerBox,
}

/// Where a plugin path points: absolute as given, otherwise inside `plugin_dir`.
pub fn resolve(plugin_dir: &Path, plugin: &Path) -> PathBuf {
    if plugin.is_absolute() {
        plugin.to_owned()
    } else {
        plugin_dir.join(plugin)
    }
}

/// The folder that holds the running router binary (where the build puts the plugins).
pub fn default_plugin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_owned))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Checks that users other than root and the router's own cannot change the plugin folder in
/// force, nor any folder above it.
pub fn check_plugin_dir(dir: &Path) -> Result<(), PluginLoadError> {
    trust::check(dir).map_err(|reason| PluginLoadError::InsecurePluginDir {
        dir: dir.to_owned(),
        reason,
    })
}

/// Loads the plugin at `path` and builds consumer `name` from its TOML settings; the consumer
/// has started nothing yet (see `ConsumerBox::start`).
pub fn load_consumer(
    name: &str,
    path: &Path,
    settings_toml: &str,
) -> Result<LoadedConsumer, PluginLoadError> {
    let not_a_plugin = |reason: String| PluginLoadError::NotAPlugin {
        consumer: name.to_owned(),
        path: path.to_owned(),
        reason,
    };
    let copy = checked_private_copy(name, path)?;
    let header = lib_header_from_path(&copy).map_err(|e| {
        // The loader names the copy; the operator knows the file.
        let reason = describe(e).replace(&copy.display().to_string(), &path.display().to_string());
        not_a_plugin(reason)
    })?;
    let contract_mismatch = |plugin| PluginLoadError::ContractMismatch {
        consumer: name.to_owned(),
        path: path.to_owned(),
        plugin,
        router: CONTRACT_VERSION,
    };
    if let Err(layout) = header.ensure_layout::<PluginModuleRef>() {
        // A plugin of another contract has another layout: say which contract it speaks.
        // SAFETY: the contract version is the first field of the root module in every
        // contract, and the only one read before the layout is known to match.
        let contract = unsafe { header.unchecked_layout::<PluginModuleRef>() }
            .ok()
            .map(|module| module.contract_version());
        return Err(match contract {
            Some(contract) if contract != CONTRACT_VERSION => contract_mismatch(contract),
            _ => not_a_plugin(describe(layout)),
        });
    }
    let module = header
        .init_root_module::<PluginModuleRef>()
        .map_err(|e| not_a_plugin(describe(e)))?;
    let contract = module.contract_version();
    if contract != CONTRACT_VERSION {
        return Err(contract_mismatch(contract));
    }
    let host = Host {
        log: log_from_plugin,
    };
    let new_consumer = module.new_consumer();
    let consumer = match new_consumer(RStr::from_str(name), RStr::from_str(settings_toml), host) {
        RResult::ROk(consumer) => consumer,
        RResult::RErr(reason) => {
            return Err(PluginLoadError::Rejected {
                consumer: name.to_owned(),
                path: path.to_owned(),
                reason: reason.into(),
            })
        }
    };
    Ok(LoadedConsumer {
        name: name.to_owned(),
        path: path.to_owned(),
        plugin_name: module.plugin_name().to_string(),
        plugin_version: module.plugin_version().to_string(),
        consumer,
    })
}

/// A plugin's log line, into the router's log (its format, its filter: target `plugin`),
/// with the plugin's name and the consumer's.
extern "C" fn log_from_plugin(
    level: LogLevel,
    plugin: RStr<'_>,
    consumer: RStr<'_>,
    message: RStr<'_>,
) {
    let (plugin, consumer, message) = (plugin.as_str(), consumer.as_str(), message.as_str());
    match level {
        LogLevel::Error => tracing::error!(target: "plugin", plugin, consumer, "{message}"),
        LogLevel::Warn => tracing::warn!(target: "plugin", plugin, consumer, "{message}"),
        LogLevel::Info => tracing::info!(target: "plugin", plugin, consumer, "{message}"),
        LogLevel::Debug => tracing::debug!(target: "plugin", plugin, consumer, "{message}"),
    }
}

/// The path of a sealed private copy of plugin file `path` for the dynamic loader, once the
/// path is found trustworthy and its contents a whole shared object of this machine.
fn checked_private_copy(name: &str, path: &Path) -> Result<PathBuf, PluginLoadError> {
    fs::metadata(path).map_err(|e| PluginLoadError::NotFound {
        consumer: name.to_owned(),
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    trust::check(path).map_err(|reason| PluginLoadError::Insecure {
        consumer: name.to_owned(),
        path: path.to_owned(),
        reason,
    })?;
    let unreadable = |reason| PluginLoadError::Unreadable {
        consumer: name.to_owned(),
        path: path.to_owned(),
        reason,
    };
    let bytes = read_regular_file(path).map_err(unreadable)?;
    elf_check::check_shared_object(&bytes).map_err(|e| PluginLoadError::NotAPlugin {
        consumer: name.to_owned(),
        path: path.to_owned(),
        reason: format!("cannot open it as a shared library: {e}"),
    })?;
    sealed_copy::sealed_copy(path, &bytes).map_err(unreadable)
}

/// The contents of regular file `path`, up to the size it had when opened (a file that
/// shrinks meanwhile reads short, which the ELF check then notices).
fn read_regular_file(path: &Path) -> io::Result<Vec<u8>> {
    let file = fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("it is not a regular file"));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(meta.len()).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A one-line reason from abi_stable's (sometimes very long) errors.
fn describe(error: LibraryError) -> String {
    match error {
        LibraryError::OpenError { err, .. } => format!("cannot open it as a shared library: {err}"),
        LibraryError::GetSymbolError { .. } => {
            "it exports no consumer plugin root module (was it built with plugin_api::export_consumer!?)".into()
        }
        LibraryError::IncompatibleVersionNumber { expected_version, actual_version, .. } => format!(
            "it was built against plugin-api {actual_version}, which is incompatible with this router's plugin-api {expected_version}"
        ),
        LibraryError::AbiInstability(_) => {
            "its plugin-api types have another layout than this router's (built against an incompatible plugin-api)".into()
        }
        other => other.to_string().lines().next().unwrap_or_default().to_owned(),
    }
}
