//! Looking up the Linux users that `run-as` names.

use std::ffi::{CStr, CString};

use anyhow::{Result, bail};

/// A user as a session needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

/// Looks up `name` in the user database; `Ok(None)` when there is no such user.
pub fn lookup(name: &str) -> Result<Option<User>> {
    let Ok(c_name) = CString::new(name) else {
        bail!("`{name}` is not a valid user name");
    };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value to be overwritten by getpwnam_r.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live memory of the stated size.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut result,
        )
    };
    if rc != 0 {
        bail!(
            "cannot look up the user `{name}`: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
    if result.is_null() {
        return Ok(None);
    }
    // SAFETY: getpwnam_r succeeded, so pw_dir points to a NUL-terminated string in `buffer`.
    let home = unsafe { CStr::from_ptr(entry.pw_dir) }
        .to_string_lossy()
        .into_owned();
    let groups = groups_of(&c_name, entry.pw_gid);
    Ok(Some(User {
        name: name.to_owned(),
        uid: entry.pw_uid,
        gid: entry.pw_gid,
        groups,
        home,
    }))
}

fn groups_of(name: &CStr, gid: u32) -> Vec<u32> {
    let mut count: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; count as usize];
        let capacity = count;
        // SAFETY: `groups` holds `count` entries; getgrouplist updates `count`.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(count.max(0) as usize);
            return groups;
        }
        if count <= capacity {
            return vec![gid];
        }
    }
}

/// The user this process runs as.
pub fn current() -> User {
    // SAFETY: these calls have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let name = std::env::var("USER").unwrap_or_else(|_| {
        if uid == 0 {
            "root".into()
        } else {
            uid.to_string()
        }
    });
    let home = std::env::var("HOME").unwrap_or_else(|_| "/".into());
    User {
        name,
        uid,
        gid,
        groups: vec![gid],
        home,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_exists_and_nobody_home_is_not_required() {
        let root = lookup("root").expect("lookup works").expect("root exists");
        assert_eq!(root.uid, 0);
        assert_eq!(lookup("no-such-user-pb").expect("lookup works"), None);
        assert!(lookup("bad\0name").is_err());
    }
}
