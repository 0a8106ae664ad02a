//! The files of the folder as last parsed: a file whose text did not change is not parsed
//! again (parsing YAML is most of a re-read's cost), and a file no watch event named whose
//! modification time did not move is not even read again (reading 100,000 Services' files is
//! tens of megabytes per change).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::parse::{self, Parsed};
use crate::cluster::Diagnostic;

/// One file's text (by hash) and what parsing it gave.
struct ParsedFile {
    /// The modification time the file had when it was read.
    modified: SystemTime,
    text_hash: u64,
    objects: Vec<Parsed>,
    diagnostics: Vec<Diagnostic>,
}

/// Parsed files by path.
#[derive(Default)]
pub struct ParsedFiles {
    files: HashMap<PathBuf, ParsedFile>,
    /// Files parsed (not taken from here) since the last [`ParsedFiles::take_parsed_count`].
    parsed_since: usize,
    /// Since the last [`ParsedFiles::take_content_changed`], a file's objects or diagnostics
    /// may have changed (a new empty file, or an unchanged text, is no change).
    content_changed: bool,
}

/// Which files may have changed since the last read of the folder.
#[derive(Clone, Debug, Default)]
pub enum ChangedFiles {
    /// Any of them (the first read, a watch error): every file is read again.
    #[default]
    All,
    /// The paths the watch events named (files, or folders: everything under them).
    Paths(HashSet<PathBuf>),
}

impl ChangedFiles {
    /// Adds what one watch event says changed; an event without paths may be anything.
    pub fn add(&mut self, paths: &[PathBuf]) {
        match self {
            ChangedFiles::All => {}
            _ if paths.is_empty() => *self = ChangedFiles::All,
            ChangedFiles::Paths(known) => known.extend(paths.iter().cloned()),
        }
    }

    /// Nothing changed yet (to start collecting a burst of events).
    pub fn none() -> ChangedFiles {
        ChangedFiles::Paths(HashSet::new())
    }

    fn includes(&self, file: &Path) -> bool {
        match self {
            ChangedFiles::All => true,
            ChangedFiles::Paths(paths) => paths.iter().any(|path| file.starts_with(path)),
        }
    }
}

/// Whether a file contributes anything to the snapshot.
fn says_something(file: &ParsedFile) -> bool {
    !file.objects.is_empty() || !file.diagnostics.is_empty()
}

fn text_hash(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

impl ParsedFiles {
    /// The objects of the file at `path` as last parsed, when `changed` does not name it and
    /// its modification time is still `modified` (its diagnostics are added to `diagnostics`);
    /// `None` when it must be read again.
    pub fn unchanged(
        &self,
        path: &Path,
        modified: SystemTime,
        changed: &ChangedFiles,
        diagnostics: &mut Vec<Diagnostic>,
    ) -> Option<Vec<Parsed>> {
        let file = self.files.get(path)?;
        if changed.includes(path) || file.modified != modified {
            return None;
        }
        diagnostics.extend(file.diagnostics.iter().cloned());
        Some(file.objects.clone())
    }

    /// The objects of the file at `path` holding `text` (read when it was last modified at
    /// `modified`), parsed only if the text changed since the last call for that path; its
    /// diagnostics are added to `diagnostics` either way.
    pub fn parse(
        &mut self,
        path: &Path,
        modified: SystemTime,
        text: &str,
        diagnostics: &mut Vec<Diagnostic>,
    ) -> Vec<Parsed> {
        let hash = text_hash(text);
        let file = match self.files.get_mut(path) {
            Some(file) if file.text_hash == hash => {
                file.modified = modified;
                &*file
            }
            _ => {
                self.parsed_since += 1;
                let mut file_diagnostics = Vec::new();
                let objects = parse::parse_file(path, text, &mut file_diagnostics);
                let parsed = ParsedFile {
                    modified,
                    text_hash: hash,
                    objects,
                    diagnostics: file_diagnostics,
                };
                let before = self.files.insert(path.to_owned(), parsed);
                let after = &self.files[path];
                self.content_changed |=
                    before.as_ref().is_some_and(says_something) || says_something(after);
                after
            }
        };
        diagnostics.extend(file.diagnostics.iter().cloned());
        file.objects.clone()
    }

    /// Forgets the files not in `present` (deleted from the folder).
    pub fn keep_only(&mut self, present: &HashSet<PathBuf>) {
        let mut removed_something = false;
        self.files.retain(|path, file| {
            let keep = present.contains(path);
            removed_something |= !keep && says_something(file);
            keep
        });
        self.content_changed |= removed_something;
    }

    /// Forgets a file that could not be read (its error is a diagnostic of this read).
    pub fn read_failed(&mut self, path: &Path) {
        self.files.remove(path);
        self.content_changed = true;
    }

    /// Whether what the files say may have changed since the last call: when it has not, a
    /// re-read gives the snapshot the last one gave (an editor creating an empty file before
    /// writing it, a file touched or rewritten with the same text).
    pub fn take_content_changed(&mut self) -> bool {
        std::mem::take(&mut self.content_changed)
    }

    /// How many files were parsed since the last call.
    pub fn take_parsed_count(&mut self) -> usize {
        std::mem::take(&mut self.parsed_since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    const SERVICE: &str =
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80}]\n";

    #[test]
    fn only_new_or_changed_texts_are_parsed() {
        let mut files = ParsedFiles::default();
        let (a, b) = (Path::new("/m/a.yaml"), Path::new("/m/b.yaml"));
        let mut diagnostics = Vec::new();
        assert_eq!(files.parse(a, T0, SERVICE, &mut diagnostics).len(), 1);
        assert_eq!(files.parse(b, T0, "kind: [", &mut diagnostics).len(), 0);
        assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
        let present: HashSet<PathBuf> = [a.to_owned(), b.to_owned()].into();
        files.keep_only(&present);
        assert_eq!(files.take_parsed_count(), 2);

        // Unchanged: taken as parsed, diagnostics included.
        let mut again = Vec::new();
        assert_eq!(files.parse(a, T0, SERVICE, &mut again).len(), 1);
        assert_eq!(files.parse(b, T0, "kind: [", &mut again).len(), 0);
        assert_eq!(again, diagnostics);
        files.keep_only(&present);
        assert_eq!(files.take_parsed_count(), 0);

        // One file changed, one deleted.
        let changed = SERVICE.replace("port: 80", "port: 81");
        assert_eq!(files.parse(a, T0, &changed, &mut Vec::new()).len(), 1);
        files.keep_only(&[a.to_owned()].into());
        assert_eq!(files.take_parsed_count(), 1);
        // A file deleted and written again with the same text is parsed again.
        assert_eq!(files.parse(b, T0, "kind: [", &mut Vec::new()).len(), 0);
        assert_eq!(files.take_parsed_count(), 1);
    }

    #[test]
    fn only_what_changes_objects_or_diagnostics_is_a_content_change() {
        let mut files = ParsedFiles::default();
        let (a, empty) = (Path::new("/m/a.yaml"), Path::new("/m/empty.yaml"));
        files.parse(a, T0, SERVICE, &mut Vec::new());
        assert!(files.take_content_changed());
        // An editor creating a file before writing it; the same text written again.
        files.parse(empty, T0, "", &mut Vec::new());
        files.parse(a, T0, SERVICE, &mut Vec::new());
        files.keep_only(&[a.to_owned()].into());
        assert!(!files.take_content_changed());
        files.parse(empty, T0, "kind: [", &mut Vec::new());
        assert!(files.take_content_changed(), "a diagnostic");
        files.keep_only(&[a.to_owned(), empty.to_owned()].into());
        files.parse(empty, T0, "", &mut Vec::new());
        assert!(files.take_content_changed(), "its diagnostic gone");
        files.keep_only(&HashSet::new());
        assert!(files.take_content_changed(), "a's Service gone");
        files.read_failed(a);
        assert!(files.take_content_changed());
    }

    #[test]
    fn a_file_is_read_again_only_when_named_by_an_event_or_modified() {
        let mut files = ParsedFiles::default();
        let (a, b) = (Path::new("/m/a.yaml"), Path::new("/m/sub/b.yaml"));
        files.parse(a, T0, SERVICE, &mut Vec::new());
        files.parse(b, T0, "kind: [", &mut Vec::new());
        let later = T0 + std::time::Duration::from_secs(1);
        let mut diagnostics = Vec::new();
        let b_only = ChangedFiles::Paths([b.to_owned()].into());
        assert_eq!(
            files
                .unchanged(a, T0, &b_only, &mut diagnostics)
                .map(|o| o.len()),
            Some(1)
        );
        assert!(files.unchanged(b, T0, &b_only, &mut diagnostics).is_none());
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        // Its own diagnostics come with a file taken as parsed.
        let a_only = ChangedFiles::Paths([a.to_owned()].into());
        assert!(files.unchanged(b, T0, &a_only, &mut diagnostics).is_some());
        assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
        // Not named, but modified since; everything under a named folder; a pathless event.
        assert!(
            files
                .unchanged(a, later, &b_only, &mut Vec::new())
                .is_none()
        );
        let folder = ChangedFiles::Paths([PathBuf::from("/m/sub")].into());
        assert!(files.unchanged(b, T0, &folder, &mut Vec::new()).is_none());
        assert!(files.unchanged(a, T0, &folder, &mut Vec::new()).is_some());
        let mut pathless = ChangedFiles::none();
        pathless.add(&[]);
        assert!(files.unchanged(a, T0, &pathless, &mut Vec::new()).is_none());
        assert!(
            files
                .unchanged(
                    Path::new("/m/new.yaml"),
                    T0,
                    &ChangedFiles::none(),
                    &mut Vec::new()
                )
                .is_none(),
            "a file never read"
        );
    }
}
