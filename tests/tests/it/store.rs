//! The store through `peerbuild cache`: round trips, a store killed mid-import, a full disk.

use std::process::Command;
use std::time::Duration;

use tests::{Project, TempDir};

fn cache(project: &Project, args: &[&str]) -> (i32, String, String) {
    let output = project
        .command()
        .arg("cache")
        .args(args)
        .output()
        .expect("runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Random-looking bytes that do not compress, made without a dependency.
fn noise(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn same_tree(a: &std::path::Path, b: &std::path::Path) -> bool {
    Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(a)
        .arg(b)
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn import_and_export_round_trip_through_the_cli() {
    let project = Project::new(&[
        ("a.txt", "alpha\n"),
        ("bin/run*", "#!/bin/sh\necho run\n"),
        ("deep/er/c", "c"),
    ]);
    std::fs::create_dir_all(project.src().join("empty")).expect("mkdir");
    let (code, digest, stderr) = cache(
        &project,
        &["import", project.src().to_str().expect("utf-8")],
    );
    assert_eq!(code, 0, "{stderr}");
    let out = project.root().join("out");
    let (code, _, stderr) = cache(&project, &["export", &digest, out.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(same_tree(&project.src(), &out));
    let (code, _, stderr) = cache(&project, &["export", &digest, out.to_str().expect("utf-8")]);
    assert_eq!(code, 3, "exporting over a non-empty folder is refused");
    assert!(stderr.contains("not empty"), "{stderr}");
    let (code, _, stderr) = cache(&project, &["export", "nonsense", "x"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("is not a digest"), "{stderr}");
    let (code, stat, _) = cache(&project, &["stat"]);
    assert_eq!(code, 0);
    assert!(
        stat.contains("objects:") && stat.contains("dedup:"),
        "{stat}"
    );
}

#[test]
fn a_store_killed_mid_import_is_consistent_on_restart() {
    let project = Project::new(&[]);
    let big = project.src().join("big.bin");
    std::fs::write(&big, noise(96 << 20, 3)).expect("write");
    for i in 0..200 {
        project.write(&format!("small/{i}.txt"), &format!("file {i}\n").repeat(50));
    }
    let mut child = project
        .command()
        .args(["cache", "import"])
        .arg(project.src())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starts");
    std::thread::sleep(Duration::from_millis(150));
    // SAFETY: kill only sends a signal to our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    let (code, digest, stderr) = cache(
        &project,
        &["import", project.src().to_str().expect("utf-8")],
    );
    assert_eq!(code, 0, "{stderr}");
    let out = project.root().join("out");
    let (code, _, stderr) = cache(&project, &["export", &digest, out.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(same_tree(&project.src(), &out));
    let tmp = project.data().join("store/tmp");
    let leftovers = std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0);
    assert_eq!(
        leftovers, 0,
        "the killed import's temporary files were cleaned up"
    );
}

#[test]
fn a_full_disk_gives_a_clear_error_and_no_corruption() {
    let mount = TempDir::new("fulldisk");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(mount.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs as root and must be able to mount a tmpfs"
        );
        eprintln!("skipping: cannot mount a tmpfs here (not root)");
        return;
    }
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(mount.path());
    let project = Project::new(&[("small.txt", "small and precious\n")]);
    let data = mount.path().join("data");
    let run = |args: &[&str]| {
        let output = project
            .command()
            .env("PEERBUILD_DATA_DIR", &data)
            .arg("cache")
            .args(args)
            .output()
            .expect("runs");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, small, stderr) = run(&["import", project.src().to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{stderr}");
    let big = TempDir::new("fulldisk-big");
    std::fs::write(big.path().join("big.bin"), noise(12 << 20, 9)).expect("write");
    let (code, _, stderr) = run(&["import", big.path().to_str().expect("utf-8")]);
    assert_eq!(code, 3);
    assert!(stderr.contains("No space left on device"), "{stderr}");
    let out = project.root().join("out");
    let (code, _, stderr) = run(&["export", &small, out.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "what was stored before is intact: {stderr}");
    assert!(same_tree(&project.src(), &out));
}
