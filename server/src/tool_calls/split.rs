//! An answer's text split into prose and calls as it streams: Hermes `<tool_call>` blocks,
//! fenced JSON blocks, and bare JSON objects at the start of the answer. Text is passed on as
//! soon as it cannot be part of a call; what may be one is held until it is known. Each decision
//! is taken on text that no later text can change, so however the answer is cut into pieces,
//! the same text and the same calls come out.

use super::fenced::{self, FenceKind};
use super::{call_from_json, ParsedCall, StreamPiece, CLOSE, OPEN};

/// One answer's splitter, fed its text piece by piece.
#[derive(Debug, Clone)]
pub(super) struct Splitter {
    /// Whether `<tool_call>` blocks are calls (the Hermes syntax).
    tool_call_tags: bool,
    /// The names of the tools offered: JSON naming another is text.
    declared: Vec<String>,
    /// Text received and not yet passed on.
    held: String,
    /// Whether `held` begins a line: fences open and close only there.
    at_line_start: bool,
    /// Whether anything but whitespace and calls has passed on: a `{` after it is prose.
    prose_seen: bool,
    /// Inside a fenced block of code, whose closing fence must not be taken for an opening one.
    in_code: bool,
}

/// What the held text begins with.
enum Step {
    /// This many bytes of text.
    Text(usize),
    /// This many bytes of text, the last of them a fence opening a block of code.
    CodeOpens(usize),
    /// This many bytes of text, the last of them the fence closing a block of code.
    CodeCloses(usize),
    /// This many bytes that were these calls.
    Calls(usize, Vec<ParsedCall>),
    /// What may be a call, not yet complete.
    Undecided,
}

/// Where something that may be a call begins.
enum Mark {
    ToolCallTag,
    /// A line that may be a fence: opening one, or in a block of code, closing it.
    Fence,
}

/// At the answer's end nothing is left undecided: what was not a call is text.
fn undecided_unless(complete: bool, len: usize) -> Step {
    if complete {
        Step::Text(len)
    } else {
        Step::Undecided
    }
}

impl Splitter {
    pub(super) fn new(tool_call_tags: bool, declared: Vec<String>) -> Self {
        Self { tool_call_tags, declared, held: String::new(), at_line_start: true, prose_seen: false, in_code: false }
    }

    pub(super) fn feed(&mut self, delta: &str) -> Vec<StreamPiece> {
        self.held.push_str(delta);
        self.drain(false)
    }

    /// Whatever is left once the answer ends.
    pub(super) fn finish(&mut self) -> Vec<StreamPiece> {
        self.drain(true)
    }

    /// `complete`: the held text is the end of the answer.
    fn drain(&mut self, complete: bool) -> Vec<StreamPiece> {
        let mut pieces = Vec::new();
        while !self.held.is_empty() {
            match self.step(complete) {
                Step::Undecided => break,
                Step::Text(len) => pieces.push(self.pass(len)),
                Step::CodeOpens(len) => {
                    pieces.push(self.pass(len));
                    self.in_code = true;
                }
                Step::CodeCloses(len) => {
                    pieces.push(self.pass(len));
                    self.in_code = false;
                }
                Step::Calls(len, calls) => {
                    self.held.drain(..len);
                    self.at_line_start = false;
                    pieces.extend(calls.into_iter().map(StreamPiece::Call));
                }
            }
        }
        pieces
    }

    /// The first `len` held bytes, passed on as text.
    fn pass(&mut self, len: usize) -> StreamPiece {
        let text: String = self.held.drain(..len).collect();
        self.at_line_start = text.ends_with('\n');
        self.prose_seen |= !text.trim().is_empty();
        StreamPiece::Content(text)
    }

    fn step(&self, complete: bool) -> Step {
        if !self.in_code && !self.prose_seen {
            if let Some(step) = self.bare_object_step(complete) {
                return step;
            }
        }
        let tag = self.next_tag().map(|at| (at, Mark::ToolCallTag));
        let fence = self.next_fence_line(complete).map(|at| (at, Mark::Fence));
        match [tag, fence].into_iter().flatten().min_by_key(|&(at, _)| at) {
            None => Step::Text(self.held.len()),
            Some((0, Mark::ToolCallTag)) => self.tag_step(complete),
            Some((0, Mark::Fence)) => self.fence_step(complete),
            Some((at, _)) => Step::Text(at),
        }
    }

    /// A bare object opening the answer, after nothing but whitespace and calls; `None` when
    /// the held text starts otherwise.
    fn bare_object_step(&self, complete: bool) -> Option<Step> {
        let start = self.held.len() - self.held.trim_start().len();
        let rest = &self.held[start..];
        if rest.is_empty() {
            return Some(undecided_unless(complete, start));
        }
        if !rest.starts_with('{') {
            return None;
        }
        Some(match fenced::bracketed_len(rest) {
            Some(len) => match fenced::calls_in_bare_object(&rest[..len], &self.declared) {
                Some(calls) => Step::Calls(start + len, calls),
                None => Step::Text(start + len),
            },
            // An unclosed brace is prose; what follows it may still hold calls.
            None if complete => Step::Text(start + 1),
            None => Step::Undecided,
        })
    }

    /// Where the first `<tool_call>` begins, or the tail that may begin one.
    fn next_tag(&self) -> Option<usize> {
        if !self.tool_call_tags {
            return None;
        }
        self.held.find(OPEN).or_else(|| match partial_prefix_len(&self.held, OPEN) {
            0 => None,
            len => Some(self.held.len() - len),
        })
    }

    /// Where the first line begins that opens a fence (in a block of code, closes it), or the
    /// unfinished last line if it may yet become one.
    fn next_fence_line(&self, complete: bool) -> Option<usize> {
        let is_fence = |line: &str| if self.in_code { fenced::is_closing_fence(line) } else { fenced::starts_fence(line) };
        line_starts(&self.held, self.at_line_start).find(|&start| {
            let rest = &self.held[start..];
            match rest.find('\n') {
                Some(end) => is_fence(&rest[..end]),
                None if complete => is_fence(rest),
                None => is_fence(rest) || fenced::may_become_fence(rest),
            }
        })
    }

    /// `<tool_call>{…}</tool_call>`, any name: the tags say it is a call.
    fn tag_step(&self, complete: bool) -> Step {
        let Some(after) = self.held.strip_prefix(OPEN) else { return undecided_unless(complete, self.held.len()) };
        let Some(end) = after.find(CLOSE) else { return undecided_unless(complete, self.held.len()) };
        let len = OPEN.len() + end + CLOSE.len();
        match call_from_json(after[..end].trim(), "arguments") {
            Some(call) => Step::Calls(len, vec![call]),
            None => Step::Text(len),
        }
    }

    /// A fence line at the start of the held text.
    fn fence_step(&self, complete: bool) -> Step {
        let Some(line_end) = self.held.find('\n').or(complete.then_some(self.held.len())) else { return Step::Undecided };
        let line = &self.held[..line_end];
        if self.in_code {
            return if fenced::is_closing_fence(line) { Step::CodeCloses(line_end) } else { undecided_unless(complete, self.held.len()) };
        }
        let with_newline = (line_end + 1).min(self.held.len());
        match fenced::opening_fence(line) {
            None => Step::Text(with_newline),
            Some(FenceKind::Code) => Step::CodeOpens(with_newline),
            Some(FenceKind::Json) => self.json_block_step(with_newline, complete),
        }
    }

    /// A block that may hold calls, its opening fence `body_start` bytes long: calls when all
    /// of it is, else text. One that does not begin like JSON is code, passed on as it comes.
    fn json_block_step(&self, body_start: usize, complete: bool) -> Step {
        let body = &self.held[body_start..];
        match body.trim_start().bytes().next() {
            None => return undecided_unless(complete, self.held.len()),
            Some(b'{' | b'[') => {}
            Some(_) => return Step::CodeOpens(body_start),
        }
        let Some((close_start, close_end)) = closing_fence_line(body, complete) else {
            return undecided_unless(complete, self.held.len());
        };
        let len = body_start + close_end;
        match fenced::calls_in_block(&body[..close_start], &self.declared) {
            Some(calls) => Step::Calls(len, calls),
            None => Step::Text(len),
        }
    }
}

/// Where each line of `text` begins (the first only when `text` begins one).
fn line_starts(text: &str, at_line_start: bool) -> impl Iterator<Item = usize> + '_ {
    at_line_start.then_some(0).into_iter().chain(text.match_indices('\n').map(|(at, _)| at + 1))
}

/// Where the first closing fence in `text` (which begins a line) begins and ends. Before the
/// answer's end, a last line without its newline may still go on, so it does not close.
fn closing_fence_line(text: &str, complete: bool) -> Option<(usize, usize)> {
    line_starts(text, true).find_map(|start| {
        let rest = &text[start..];
        let line = match rest.find('\n') {
            Some(end) => &rest[..end],
            None if complete => rest,
            None => return None,
        };
        fenced::is_closing_fence(line).then_some((start, start + line.len()))
    })
}

/// The length of the longest tail of `text` that begins `pattern` (but is not all of it).
fn partial_prefix_len(text: &str, pattern: &str) -> usize {
    (1..pattern.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && pattern.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::super::{parse, CallStream, ToolSyntax};
    use super::*;

    fn declared() -> Vec<String> {
        vec!["get_weather".into(), "get_time".into()]
    }

    fn weather(city: &str) -> ParsedCall {
        ParsedCall { name: "get_weather".into(), arguments: format!(r#"{{"city":"{city}"}}"#) }
    }

    fn hermes(text: &str) -> (String, Vec<ParsedCall>) {
        parse(ToolSyntax::Hermes, &declared(), text)
    }

    /// `text` cut into pieces of `size` bytes (a little more where a character would be cut).
    fn chunks(text: &str, size: usize) -> Vec<&str> {
        let (mut pieces, mut rest) = (Vec::new(), text);
        while !rest.is_empty() {
            let mut cut = size.min(rest.len());
            while !rest.is_char_boundary(cut) {
                cut += 1;
            }
            pieces.push(&rest[..cut]);
            rest = &rest[cut..];
        }
        pieces
    }

    /// The pieces of `text` fed to `stream` in pieces of `size` bytes.
    fn feed(stream: &mut CallStream, text: &str, size: usize) -> Vec<StreamPiece> {
        chunks(text, size).into_iter().flat_map(|chunk| stream.feed(chunk)).collect()
    }

    /// The text and the calls among `pieces`.
    fn text_and_calls(pieces: Vec<StreamPiece>) -> (String, Vec<ParsedCall>) {
        let (mut content, mut calls) = (String::new(), Vec::new());
        for piece in pieces {
            match piece {
                StreamPiece::Content(text) => content.push_str(&text),
                StreamPiece::Call(call) => calls.push(call),
            }
        }
        (content, calls)
    }

    /// The text and calls of `text` streamed in pieces of `size` bytes.
    fn streamed(syntax: ToolSyntax, text: &str, size: usize) -> (String, Vec<ParsedCall>) {
        let mut stream = CallStream::new(syntax, declared());
        let mut pieces = feed(&mut stream, text, size);
        pieces.extend(stream.finish());
        text_and_calls(pieces)
    }

    const FENCED: &str = "I'll check.\n```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n```";

    #[test]
    fn a_fenced_block_naming_a_tool_is_a_call() {
        assert_eq!(hermes(FENCED), ("I'll check.".into(), vec![weather("Paris")]));
        let bare_fence = "```\n{\"name\": \"get_weather\", \"parameters\": \"{\\\"city\\\": \\\"Zürich\\\"}\"}\n```\nDone.";
        assert_eq!(hermes(bare_fence), ("Done.".into(), vec![weather("Zürich")]));
    }

    #[test]
    fn a_bare_object_opening_the_answer_is_a_call() {
        assert_eq!(hermes(" {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"), (String::new(), vec![weather("Paris")]));
        let two = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\nBoth asked.";
        assert_eq!(hermes(two), ("Both asked.".into(), vec![weather("Oslo"), weather("Rome")]));
        let after_prose = "Try {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}";
        assert_eq!(hermes(after_prose), (after_prose.into(), Vec::new()));
    }

    #[test]
    fn two_blocks_or_an_array_are_several_calls() {
        let two = format!("{FENCED}\nAnd:\n```json\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"Lima\"}}}}\n```\n");
        assert_eq!(hermes(&two), ("I'll check.\n\nAnd:".into(), vec![weather("Paris"), weather("Lima")]));
        let array = "```json\n[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}},\n {\"name\": \"get_time\", \"arguments\": {}}]\n```";
        let time = ParsedCall { name: "get_time".into(), arguments: "{}".into() };
        assert_eq!(hermes(array), (String::new(), vec![weather("Oslo"), time]));
    }

    #[test]
    fn what_is_not_a_call_to_an_offered_tool_stays_text() {
        let texts = [
            "```json\n{\"name\": \"launch_rockets\", \"arguments\": {}}\n```",
            "{\"name\": \"launch_rockets\", \"arguments\": {}}",
            "```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \n```\nafter",
            "```json\n{\"name\": \"get_weather\", \"arguments\": [\"Paris\"]}\n```",
            "{\"name\": \"get_weather\", \"arguments\": \"Paris\"}",
            "```python\nprint({\"name\": \"get_weather\", \"arguments\": {}})\n```\n",
            "```\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}",
            "{ \"unclosed\": ",
            "Use ```json``` fences.",
            "",
        ];
        for text in texts {
            assert_eq!(hermes(text), (text.to_string(), Vec::new()), "{text}");
        }
    }

    #[test]
    fn a_code_block_closing_is_not_a_block_opening() {
        let text = "```python\nx = 1\n```\nThen:\n```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n```";
        assert_eq!(hermes(text), ("```python\nx = 1\n```\nThen:".into(), vec![weather("Oslo")]));
        let plain = "```\nls -la\n```\n```json\n{\"name\": \"get_time\", \"arguments\": {}}\n```";
        assert_eq!(hermes(plain).1.len(), 1);
    }

    #[test]
    fn llama_answers_take_plain_json_calls_too() {
        let (content, calls) = parse(ToolSyntax::Llama31Json, &declared(), FENCED);
        assert_eq!((content.as_str(), calls), ("I'll check.", vec![weather("Paris")]));
        let unknown = "{\"name\": \"unknown\", \"parameters\": {}}";
        assert_eq!(parse(ToolSyntax::Llama31Json, &declared(), unknown).1.len(), 1, "a whole-answer Llama call is a call by its syntax");
    }

    #[test]
    fn streaming_in_any_pieces_gives_what_parsing_gives() {
        let answers = [
            FENCED.to_string(),
            format!("{FENCED}\n\n{FENCED}\nand after"),
            "  {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n{\"name\": \"get_time\", \"arguments\": {}}\nok".to_string(),
            "```python\ns = \"```\"\n  ```\n```json\n[{\"name\": \"get_time\", \"arguments\": {}}]\n```\r\nend".to_string(),
            "Sure. <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lima\"}}\n</tool_call> done <tool".to_string(),
            "```\n<tool_call>\n{\"name\": \"other\", \"arguments\": {}}\n</tool_call>\n```".to_string(),
            "{ not json } then\n```json\n{\"name\": \"get_time\", \"arguments\": {}}\n```".to_string(),
            "{ never closed\n```json\n{\"name\": \"get_time\", \"arguments\": {}}\n```".to_string(),
            "No calls here, ``just`` text\n``` \nwith a fence left open".to_string(),
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\"}}".to_string(),
        ];
        for answer in &answers {
            for syntax in [ToolSyntax::Hermes, ToolSyntax::Llama31Json] {
                let (content, calls) = parse(syntax, &declared(), answer);
                for size in [1, 3, 7] {
                    let (streamed_content, streamed_calls) = streamed(syntax, answer, size);
                    assert_eq!(streamed_calls, calls, "{syntax:?} in {size}-byte pieces: {answer}");
                    let streamed_content = if calls.is_empty() { streamed_content } else { streamed_content.trim().to_string() };
                    assert_eq!(streamed_content, content, "{syntax:?} in {size}-byte pieces: {answer}");
                }
            }
        }
    }

    #[test]
    fn prose_and_code_pass_on_before_a_block_closes() {
        let mut stream = CallStream::new(ToolSyntax::Hermes, declared());
        let inside_the_block = FENCED.len() - 10;
        assert_eq!(text_and_calls(feed(&mut stream, &FENCED[..inside_the_block], 3)).0, "I'll check.\n");
        assert_eq!(stream.feed(&FENCED[inside_the_block..]), Vec::new());
        assert_eq!(stream.finish(), vec![StreamPiece::Call(weather("Paris"))]);

        let code = "```python\nprint(1)\nprint(2)";
        assert_eq!(text_and_calls(feed(&mut CallStream::new(ToolSyntax::Hermes, declared()), code, 3)).0, code);
        let held = feed(&mut CallStream::new(ToolSyntax::Hermes, declared()), "{\"name\": \"get_weather\"", 3);
        assert_eq!(held, Vec::new(), "an answer opening with `{{` may be a call");
    }
}
