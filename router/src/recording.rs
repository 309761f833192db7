//! Recordings of batches: one JSON `ProfileBatch` per line, written by `router --record`
//! and read back by the replay producer.

use std::{
    fs::File,
    io::{BufRead, BufReader, BufWriter, Write},
    path::{Path, PathBuf},
};

use plugin_api::ProfileBatch;

/// Appends batches to a recording file.
pub struct Recorder {
    path: PathBuf,
    out: BufWriter<File>,
}

impl Recorder {
    /// Creates (or truncates) the recording at `path`.
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let file = File::create(path)
            .map_err(|e| anyhow::anyhow!("cannot create recording {}: {e}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            out: BufWriter::new(file),
        })
    }

    /// Writes one batch as one line, flushed so that an interrupted run keeps what it wrote.
    pub fn write(&mut self, batch: &ProfileBatch) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.out, batch)?;
        self.out.write_all(b"\n")?;
        self.out
            .flush()
            .map_err(|e| anyhow::anyhow!("writing recording {}: {e}", self.path.display()))
    }
}

/// Reads every batch of the recording at `path`; a line that is not a well-formed batch (JSON,
/// every index in range) is an error naming its number.
pub fn read_recording(path: &Path) -> anyhow::Result<Vec<ProfileBatch>> {
    let file = File::open(path)
        .map_err(|e| anyhow::anyhow!("cannot open recording {}: {e}", path.display()))?;
    let mut batches = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let bad =
            |why: String| anyhow::anyhow!("recording {} line {}: {why}", path.display(), i + 1);
        let line = line.map_err(|e| bad(format!("cannot be read: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let batch: ProfileBatch =
            serde_json::from_str(&line).map_err(|e| bad(format!("not a batch: {e}")))?;
        batch
            .check_indices()
            .map_err(|e| bad(format!("a batch with an index out of range: {e}")))?;
        batches.push(batch);
    }
    Ok(batches)
}
