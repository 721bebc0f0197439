//! Test reports: finding a report group's files and reading JUnit XML into pass/fail counts.
//!
//! Report files are chosen by the same rules as artifacts (`files`, `base-directory`,
//! `discard-paths`; see [`super::artifacts`]). JUnit XML is the format users expect to see
//! counted with the build result; files of the other formats are only listed.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

use protocol::buildspec::{ArtifactSet, Report, ReportFormat};
use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};
use serde::Serialize;

use super::artifacts::{self, Entry, EntryKind};

/// Test case counts from one or more JUnit files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
    pub errored: u64,
}

impl TestCounts {
    pub fn total(&self) -> u64 {
        self.passed
            .saturating_add(self.failed)
            .saturating_add(self.skipped)
            .saturating_add(self.errored)
    }

    fn add(&mut self, other: TestCounts) {
        self.passed = self.passed.saturating_add(other.passed);
        self.failed = self.failed.saturating_add(other.failed);
        self.skipped = self.skipped.saturating_add(other.skipped);
        self.errored = self.errored.saturating_add(other.errored);
    }

    fn count(&mut self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Passed => &mut self.passed,
            Outcome::Skipped => &mut self.skipped,
            Outcome::Errored => &mut self.errored,
            Outcome::Failed => &mut self.failed,
        };
        *counter = counter.saturating_add(1);
    }
}

/// Why a JUnit file could not be counted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// `column` counts bytes from the start of the line, both starting at 1.
    #[error("malformed XML at line {line}, column {column}")]
    Malformed {
        line: usize,
        column: usize,
        source: quick_xml::Error,
    },
    #[error("the file ends inside <{element}>")]
    Unclosed { element: String },
    #[error("<{element}> has {attribute}={value:?}, which is not a count")]
    BadCount {
        element: String,
        attribute: String,
        value: String,
    },
    #[error("no <testsuites>, <testsuite> or <testcase> element")]
    NotJunit,
}

/// Counts the test cases of a JUnit XML document.
///
/// Every `<testcase>` counts once, however `<testsuites>` and `<testsuite>` nest around it: it is
/// failed with a `<failure>` child, errored with an `<error>` child, skipped with a `<skipped>`
/// child, and passed otherwise. When a case has several of these, failure wins over error and
/// error over skipped, so a test that failed is never shown as merely broken. A document without
/// any `<testcase>` falls back to the `tests`, `failures`, `errors` and `skipped` attributes of
/// its innermost `<testsuite>` elements; outer suites are left out because tools write their
/// totals there, which would count the inner suites twice.
pub fn parse_junit(xml: &str) -> Result<TestCounts, ReportError> {
    let mut reader = Reader::from_str(xml);
    let mut junit = JunitReader::default();
    loop {
        let event = reader
            .read_event()
            .map_err(|source| malformed(xml, reader.error_position(), source))?;
        let at = Location {
            xml,
            offset: reader.buffer_position(),
        };
        match event {
            Event::Start(tag) => junit.open(&tag, at)?,
            Event::Empty(tag) => {
                junit.open(&tag, at)?;
                junit.close();
            }
            Event::End(_) => junit.close(),
            Event::Eof => break,
            _ => {}
        }
    }
    junit.finish()
}

/// What happened to one test case, in rising order of precedence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Passed,
    Skipped,
    Errored,
    Failed,
}

/// An element that is open while reading.
struct Open {
    name: String,
    frame: Frame,
}

enum Frame {
    Suite {
        declared: TestCounts,
        has_inner_suite: bool,
    },
    Case {
        outcome: Outcome,
    },
    Other,
}

/// Where the reader is, for error messages; turned into a line and column only on error.
#[derive(Clone, Copy)]
struct Location<'a> {
    xml: &'a str,
    offset: u64,
}

#[derive(Default)]
struct JunitReader {
    stack: Vec<Open>,
    cases: TestCounts,
    saw_case: bool,
    /// Totals declared by innermost suites, used only when there is no `<testcase>`.
    declared: TestCounts,
    saw_suite: bool,
}

impl JunitReader {
    fn open(&mut self, tag: &BytesStart, at: Location) -> Result<(), ReportError> {
        let local_name = tag.local_name();
        let name = local_name.as_ref();
        let frame = match name {
            "testsuites" => {
                self.saw_suite = true;
                Frame::Other
            }
            "testsuite" => {
                self.saw_suite = true;
                self.mark_inner_suite();
                let declared = declared_counts(tag, at)?;
                Frame::Suite {
                    declared,
                    has_inner_suite: false,
                }
            }
            "testcase" => {
                self.saw_case = true;
                Frame::Case {
                    outcome: Outcome::Passed,
                }
            }
            "failure" => self.mark_case(Outcome::Failed),
            "error" => self.mark_case(Outcome::Errored),
            "skipped" => self.mark_case(Outcome::Skipped),
            _ => Frame::Other,
        };
        self.stack.push(Open {
            name: name.to_owned(),
            frame,
        });
        Ok(())
    }

    /// quick-xml checks that end tags match start tags, so the top of the stack is the element
    /// being closed.
    fn close(&mut self) {
        match self.stack.pop().map(|open| open.frame) {
            Some(Frame::Case { outcome }) => self.cases.count(outcome),
            Some(Frame::Suite {
                declared,
                has_inner_suite: false,
            }) => self.declared.add(declared),
            _ => {}
        }
    }

    /// Records an outcome element, which counts only as a direct child of a `<testcase>`.
    fn mark_case(&mut self, found: Outcome) -> Frame {
        if let Some(Open {
            frame: Frame::Case { outcome },
            ..
        }) = self.stack.last_mut()
        {
            *outcome = (*outcome).max(found);
        }
        Frame::Other
    }

    fn mark_inner_suite(&mut self) {
        let enclosing = self
            .stack
            .iter_mut()
            .rev()
            .find_map(|open| match &mut open.frame {
                Frame::Suite {
                    has_inner_suite, ..
                } => Some(has_inner_suite),
                _ => None,
            });
        if let Some(has_inner_suite) = enclosing {
            *has_inner_suite = true;
        }
    }

    fn finish(self) -> Result<TestCounts, ReportError> {
        if let Some(open) = self.stack.last() {
            return Err(ReportError::Unclosed {
                element: open.name.clone(),
            });
        }
        if self.saw_case {
            Ok(self.cases)
        } else if self.saw_suite {
            Ok(self.declared)
        } else {
            Err(ReportError::NotJunit)
        }
    }
}

/// The counts a `<testsuite>` declares in its attributes; missing attributes count as zero.
fn declared_counts(tag: &BytesStart, at: Location) -> Result<TestCounts, ReportError> {
    let (mut tests, mut failures, mut errors, mut skipped) = (0, 0, 0, 0);
    for attribute in tag.attributes() {
        let attribute = attribute.map_err(|error| malformed(at.xml, at.offset, error.into()))?;
        let key = attribute.key.local_name();
        let slot = match key.as_ref() {
            "tests" => &mut tests,
            "failures" => &mut failures,
            "errors" => &mut errors,
            "skipped" => &mut skipped,
            _ => continue,
        };
        let value = attribute.value.trim();
        *slot = value.parse::<u64>().map_err(|_| ReportError::BadCount {
            element: tag.local_name().as_ref().to_owned(),
            attribute: key.as_ref().to_owned(),
            value: value.to_owned(),
        })?;
    }
    let not_passed = failures.saturating_add(errors).saturating_add(skipped);
    Ok(TestCounts {
        passed: tests.saturating_sub(not_passed),
        failed: failures,
        skipped,
        errored: errors,
    })
}

fn malformed(xml: &str, offset: u64, source: quick_xml::Error) -> ReportError {
    let offset = usize::try_from(offset).unwrap_or(usize::MAX).min(xml.len());
    let before = &xml.as_bytes()[..offset];
    let line = before.iter().filter(|&&byte| byte == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&byte| byte == b'\n')
        .map_or(0, |i| i + 1);
    ReportError::Malformed {
        line,
        column: offset - line_start + 1,
        source,
    }
}

/// The files of one report group and, for JUnit XML, their summed counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReportOutcome {
    pub name: String,
    pub format: ReportFormat,
    /// Each file's path in the report group, as artifacts would name it: relative to
    /// `base-directory`, or just the file name under `discard-paths`.
    pub files: Vec<PathBuf>,
    /// For JUnit XML, the sum over the files that could be read; `None` for other formats and
    /// when no file could be read.
    pub counts: Option<TestCounts>,
    /// What went wrong, one sentence each; a bad file does not stop the others being counted.
    pub problems: Vec<String>,
}

/// Finds and reads the files of report group `name`. Problems are recorded in the outcome, never
/// returned as an error, because a broken report must not hide the build's other results.
pub fn collect(build_dir: &Path, name: &str, report: &Report) -> ReportOutcome {
    let mut outcome = ReportOutcome {
        name: name.to_owned(),
        format: report.file_format,
        files: Vec::new(),
        counts: None,
        problems: Vec::new(),
    };
    let selected = match artifacts::select(build_dir, &artifact_set(report)) {
        Ok(selected) => selected,
        Err(error) => {
            outcome.problems.push(error_chain(&error));
            return outcome;
        }
    };
    outcome.problems.extend(selected.warnings);
    let files: Vec<Entry> = selected
        .entries
        .into_iter()
        .filter(|entry| matches!(entry.kind, EntryKind::File { .. }))
        .collect();
    if report.file_format == ReportFormat::JunitXml {
        outcome.counts = sum_junit(&files, &mut outcome.problems);
    }
    outcome.files = files.into_iter().map(|entry| entry.dest).collect();
    outcome
}

/// A report group's files are chosen like an artifact block without exclusions or symlinks.
fn artifact_set(report: &Report) -> ArtifactSet {
    ArtifactSet {
        files: report.files.clone(),
        base_directory: report.base_directory.clone(),
        discard_paths: report.discard_paths,
        ..ArtifactSet::default()
    }
}

fn sum_junit(files: &[Entry], problems: &mut Vec<String>) -> Option<TestCounts> {
    let mut total: Option<TestCounts> = None;
    for entry in files {
        match read_junit(&entry.source) {
            Ok(counts) => total.get_or_insert_default().add(counts),
            Err(problem) => problems.push(format!("{}: {problem}", entry.dest.display())),
        }
    }
    total
}

fn read_junit(path: &Path) -> Result<TestCounts, String> {
    let xml = fs::read_to_string(path).map_err(|error| format!("cannot read: {error}"))?;
    parse_junit(&xml).map_err(|error| error_chain(&error))
}

/// An error and its causes on one line, as a user should see them.
fn error_chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let inner_text = inner.to_string();
        // Some errors (quick-xml's among them) already end with their cause's message.
        if !text.ends_with(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        cause = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    fn check_junit(xml: &str, expect: Expect) {
        let actual = match parse_junit(xml) {
            Ok(counts) => format!("{counts:?} total={}", counts.total()),
            Err(error) => format!("error: {}", error_chain(&error)),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn counts_each_outcome() {
        check_junit(
            r#"<?xml version="1.0" encoding="UTF-8"?>
            <testsuite name="unit" tests="99" failures="99">
              <testcase name="a" classname="A" time="0.1"/>
              <testcase name="b"><failure message="boom">trace &amp; more</failure></testcase>
              <testcase name="c"><error type="Panic"/></testcase>
              <testcase name="d"><skipped message="later"/></testcase>
              <testcase name="e"><system-out>fine</system-out></testcase>
              <testcase name="f"><error/><failure/></testcase>
              <testcase name="g"><system-err><failure/></system-err></testcase>
            </testsuite>"#,
            expect!["TestCounts { passed: 3, failed: 2, skipped: 1, errored: 1 } total=7"],
        );
    }

    #[test]
    fn reads_a_document_with_a_byte_order_mark() {
        check_junit(
            "\u{feff}<?xml version=\"1.0\"?><testsuite><testcase name=\"a\"/></testsuite>",
            expect!["TestCounts { passed: 1, failed: 0, skipped: 0, errored: 0 } total=1"],
        );
    }

    #[test]
    fn counts_cases_in_nested_suites() {
        check_junit(
            r#"<testsuites tests="3">
              <testsuite name="outer">
                <testcase name="top"/>
                <testsuite name="inner">
                  <testcase name="x"><failure/></testcase>
                  <testsuite name="innermost"><testcase name="y"><skipped/></testcase></testsuite>
                </testsuite>
              </testsuite>
              <testsuite name="other"><testcase name="z"/></testsuite>
            </testsuites>"#,
            expect!["TestCounts { passed: 2, failed: 1, skipped: 1, errored: 0 } total=4"],
        );
    }

    #[test]
    fn falls_back_to_innermost_suite_attributes() {
        check_junit(
            r#"<testsuites tests="100" failures="50">
              <testsuite name="all" tests="14" failures="2" errors="1" skipped="3">
                <testsuite name="a" tests="10" failures="2" errors="1" skipped="3"/>
                <testsuite name="b" tests="4"></testsuite>
              </testsuite>
            </testsuites>"#,
            expect!["TestCounts { passed: 8, failed: 2, skipped: 3, errored: 1 } total=14"],
        );
        check_junit(
            r#"<testsuites/>"#,
            expect!["TestCounts { passed: 0, failed: 0, skipped: 0, errored: 0 } total=0"],
        );
    }

    #[test]
    fn malformed_documents_say_what_and_where() {
        check_junit(
            "<testsuite>\n  <testcase name=\"a\">\n</testsuite>",
            expect![
                "error: malformed XML at line 3, column 1: ill-formed document: expected `</testcase>`, but `</testsuite>` was found"
            ],
        );
        check_junit(
            "<testsuite>\n  <testcase name=\"a\"/>\n",
            expect!["error: the file ends inside <testsuite>"],
        );
        check_junit(
            "<testsuite tests=\"1\" tests=\"2\"/>",
            expect![
                "error: malformed XML at line 1, column 33: error while parsing attribute: position 20: duplicated attribute, previous declaration at position 10"
            ],
        );
        check_junit(
            "<testsuite tests=\"many\"/>",
            expect![[r#"error: <testsuite> has tests="many", which is not a count"#]],
        );
        check_junit(
            "<html><body/></html>",
            expect!["error: no <testsuites>, <testsuite> or <testcase> element"],
        );
        check_junit(
            "",
            expect!["error: no <testsuites>, <testsuite> or <testcase> element"],
        );
    }

    fn write(path: &Path, content: &str) {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, content).expect("write");
    }

    fn check_collect(report: Report, expect: Expect) {
        let temp = tempfile::tempdir().expect("temp dir");
        let build = temp.path();
        write(
            &build.join("reports/unit.xml"),
            r#"<testsuite><testcase name="a"/><testcase name="b"><failure/></testcase></testsuite>"#,
        );
        write(
            &build.join("reports/sub/integration.xml"),
            r#"<testsuites><testsuite tests="5" skipped="1" errors="1"/></testsuites>"#,
        );
        write(&build.join("reports/broken.xml"), "<testsuite><testcase>");
        write(&build.join("reports/cucumber.json"), "[]");
        let outcome = collect(build, "unit-tests", &report);
        let json = serde_json::to_string_pretty(&outcome).expect("json");
        expect.assert_eq(&json);
    }

    fn report(files: &[&str], format: ReportFormat) -> Report {
        Report {
            files: files.iter().map(|file| (*file).to_owned()).collect(),
            base_directory: Some("reports".to_owned()),
            discard_paths: false,
            file_format: format,
        }
    }

    #[test]
    fn collect_sums_junit_files_and_reports_broken_ones() {
        check_collect(
            report(&["**/*.xml"], ReportFormat::JunitXml),
            expect![[r#"
            {
              "name": "unit-tests",
              "format": "JunitXml",
              "files": [
                "broken.xml",
                "sub/integration.xml",
                "unit.xml"
              ],
              "counts": {
                "passed": 4,
                "failed": 1,
                "skipped": 1,
                "errored": 1
              },
              "problems": [
                "broken.xml: the file ends inside <testcase>"
              ]
            }"#]],
        );
    }

    #[test]
    fn collect_lists_other_formats_without_counting() {
        check_collect(
            report(&["*.json"], ReportFormat::CucumberJson),
            expect![[r#"
            {
              "name": "unit-tests",
              "format": "CucumberJson",
              "files": [
                "cucumber.json"
              ],
              "counts": null,
              "problems": []
            }"#]],
        );
    }

    #[test]
    fn collect_without_matching_files_records_a_problem() {
        check_collect(
            report(&["*.trx"], ReportFormat::VisualStudioTrx),
            expect![[r#"
                {
                  "name": "unit-tests",
                  "format": "VisualStudioTrx",
                  "files": [],
                  "counts": null,
                  "problems": [
                    "no matching artifact paths found for [\"*.trx\"]"
                  ]
                }"#]],
        );
    }
}
