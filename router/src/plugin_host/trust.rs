//! Whether a plugin path can be trusted, checked like sshd's StrictModes: the path as named
//! (a symbolic link itself too) and the file it resolves to, and every folder above each up
//! to `/`, must be owned by root or the router's own user and writable by no one else. Only
//! then can no other user swap the code the router (often root) is about to run.

use std::{fs, io, os::unix::fs::MetadataExt, path::Path};

/// A path on the way to a plugin that users other than root and the router's own could change.
#[derive(Debug, thiserror::Error)]
#[error("{subject} {problem}")]
pub struct Untrusted {
    /// What the path is to the checked file: `it`, `its target /x`, `the folder /x`.
    subject: String,
    /// What is wrong with it.
    problem: Problem,
}

/// What is wrong with an untrusted path.
#[derive(Debug, thiserror::Error)]
enum Problem {
    #[error("is owned by uid {uid}, neither root nor the router's user (uid {router_uid})")]
    Owner { uid: u32, router_uid: u32 },
    #[error("is writable by {who} (mode {mode:o}){without_sticky}; make it writable by its owner only (chmod go-w)")]
    Writable {
        who: String,
        mode: u32,
        without_sticky: &'static str,
    },
    #[error("cannot be inspected: {0}")]
    Uninspectable(io::Error),
}

/// Checks `target` (a plugin file, or the plugin folder) as named and as resolved, and
/// every folder above each.
pub fn check(target: &Path) -> Result<(), Untrusted> {
    let uninspectable = |subject: String| {
        move |e| Untrusted {
            subject,
            problem: Problem::Uninspectable(e),
        }
    };
    let named = std::path::absolute(target).map_err(uninspectable("it".into()))?;
    check_chain(&named, "it")?;
    let resolved = fs::canonicalize(&named).map_err(uninspectable("its target".into()))?;
    if resolved != named {
        check_chain(&resolved, &format!("its target {}", resolved.display()))?;
    }
    Ok(())
}

/// Checks `leaf` (called `leaf_subject` in errors) and every path above it, without following
/// symbolic links: each is owned by root or the router's user, and none but a symbolic link
/// (whose mode means nothing) is writable by group or others, except a folder with the
/// sticky bit above the leaf: the entry below it was checked to be owned by root or the
/// router's user, and the sticky bit keeps others from renaming or replacing it.
fn check_chain(leaf: &Path, leaf_subject: &str) -> Result<(), Untrusted> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let router_uid = unsafe { libc::geteuid() };
    for path in leaf.ancestors() {
        let is_leaf = path == leaf;
        let subject = |kind: &str| match is_leaf {
            true => leaf_subject.to_owned(),
            false => format!("the {kind} {}", path.display()),
        };
        let meta = fs::symlink_metadata(path).map_err(|e| Untrusted {
            subject: subject("folder"),
            problem: Problem::Uninspectable(e),
        })?;
        let is_link = meta.file_type().is_symlink();
        let kind = if is_link { "symbolic link" } else { "folder" };
        if meta.uid() != 0 && meta.uid() != router_uid {
            return Err(Untrusted {
                subject: subject(kind),
                problem: Problem::Owner {
                    uid: meta.uid(),
                    router_uid,
                },
            });
        }
        let mode = meta.mode() & 0o7777;
        let sticky_above_leaf = !is_leaf && mode & libc::S_ISVTX != 0;
        if is_link || mode & 0o022 == 0 || sticky_above_leaf {
            continue;
        }
        return Err(Untrusted {
            subject: subject(kind),
            problem: Problem::Writable {
                who: if mode & 0o002 != 0 {
                    "every user".into()
                } else {
                    format!("its group (gid {})", meta.gid())
                },
                mode,
                without_sticky: if is_leaf {
                    ""
                } else {
                    " and has no sticky bit"
                },
            },
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn set_mode(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_sticky_world_writable_folder_is_fine_above_but_not_as_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::write(shared.join("lib.so"), "").unwrap();
        set_mode(&shared.join("lib.so"), 0o644);
        set_mode(&shared, 0o1777);
        check(&shared.join("lib.so")).unwrap();
        let refusal = check(&shared).unwrap_err().to_string();
        assert!(
            refusal.starts_with("it is writable by every user (mode 1777);"),
            "{refusal}"
        );
        set_mode(&shared, 0o775);
        let refusal = check(&shared.join("lib.so")).unwrap_err().to_string();
        assert!(
            refusal.starts_with(&format!(
                "the folder {} is writable by its group (gid ",
                shared.display()
            )) && refusal.contains("(mode 775) and has no sticky bit;"),
            "{refusal}"
        );
    }
}
