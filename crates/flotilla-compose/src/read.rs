//! Reading the files a Compose file names (itself, `env_file`s) with a size cap, refusing
//! anything but a regular file: a FIFO would block the CLI forever and `/dev/zero` would fill
//! its memory.

use std::io::{Error, ErrorKind, Read};
use std::path::Path;

/// Largest Compose file or `env_file` read (a deploy request is capped at 8 MiB).
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// Reads `path` as UTF-8 text if it is a regular file of at most `max` bytes.
pub fn read_capped(path: &Path, max: u64) -> std::io::Result<String> {
    // Checked before opening: opening a FIFO blocks until a writer appears.
    regular_file(&std::fs::metadata(path)?)?;
    let file = std::fs::File::open(path)?;
    // Checked again on what was opened, in case the path was swapped in between.
    regular_file(&file.metadata()?)?;
    let mut text = String::new();
    file.take(max + 1).read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("larger than the limit of {max} bytes"),
        ));
    }
    Ok(text)
}

fn regular_file(meta: &std::fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a special file"
    };
    Err(Error::new(
        ErrorKind::InvalidInput,
        format!("not a regular file (it is {what})"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_devices_fifos_and_directories() {
        let dev = read_capped(Path::new("/dev/zero"), MAX_FILE_BYTES).expect_err("device");
        assert!(dev.to_string().contains("it is a device"), "{dev}");
        let dir = tempfile::tempdir().expect("tempdir");
        let err = read_capped(dir.path(), MAX_FILE_BYTES).expect_err("directory");
        assert!(err.to_string().contains("a directory"), "{err}");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        // Without the check this blocks forever: nobody writes to the FIFO.
        let err = read_capped(&fifo, MAX_FILE_BYTES).expect_err("fifo");
        assert!(err.to_string().contains("a FIFO"), "{err}");
    }

    #[test]
    fn refuses_files_over_the_cap_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big.env");
        std::fs::write(&path, "A=b\n".repeat(300)).expect("write");
        assert_eq!(read_capped(&path, 1200).expect("at the cap").len(), 1200);
        let err = read_capped(&path, 1199).expect_err("over the cap");
        assert!(err.to_string().contains("limit of 1199 bytes"), "{err}");
    }
}
