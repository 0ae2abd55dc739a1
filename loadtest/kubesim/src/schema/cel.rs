//! A small CEL interpreter for `x-kubernetes-validations`.
//!
//! Supported: int (incl. hex), uint (`1u`), double, string (`'…'`, `"…"`, triple-quoted, raw
//! `r'…'`, escapes), bool and null literals; list and map literals; `self`, `oldSelf` and
//! comprehension variables; field selection, `has()`, indexing; `! -`,
//! `* / % + - < <= > >= == != in && ||` (with CEL's commutative error handling for `&&`/`||`)
//! and `?:`; `size`, `startsWith`, `endsWith`, `contains`, `matches`, `lowerAscii`,
//! `upperAscii`, `trim`, `join`, `int`, `uint`, `double`, `string`, `bool`, `dyn`; and the
//! macros `all`, `exists`, `exists_one`, `map`, `filter`. Runtime errors use cel-go's wording
//! (`no such key: x`, `no such overload`, `division by zero`, `integer overflow`, ...).
//! Not supported (rejected when the schema compiles): other functions, bytes, timestamps,
//! durations, optionals, type checking beyond runtime types.
//!
//! Why not `kube-cel` 0.6 / `cel` 0.13 (tried on this module's own test expressions): `1 ==
//! 1.0` is false there (cel-go compares numbers across types), JSON integers become uints (so
//! `7 / 2 == 3` has no overload), 7 of 8 runtime errors are worded differently from cel-go
//! (`Division by zero of Int(1)`, `No such key`), and undeclared functions or variables compile
//! and fail only when a rule runs, so a CRD the apiserver refuses would be accepted. kubectl
//! users would see other messages and outcomes; an adapter could reword errors, not that.

use std::cmp::Ordering;
use std::rc::Rc;

use regex::Regex;
use serde_json::Value;

pub(super) const NO_OVERLOAD: &str = "no such overload";

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Lit {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Double(f64),
    Str(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BinOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    In,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CompKind {
    All,
    Exists,
    ExistsOne,
    Map,
    Filter,
}

#[derive(Debug, Clone)]
pub(super) enum Expr {
    Lit(Lit),
    Ident(String),
    Select(Box<Expr>, String),
    Has(Box<Expr>, String),
    Index(Box<Expr>, Box<Expr>),
    Call {
        target: Option<Box<Expr>>,
        name: String,
        args: Vec<Expr>,
    },
    /// `matches` with a literal pattern, compiled once.
    Matches(Box<Expr>, Regex),
    Not(Box<Expr>),
    Neg(Box<Expr>),
    Bin(BinOp, Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Cond(Box<Expr>, Box<Expr>, Box<Expr>),
    List(Vec<Expr>),
    Map(Vec<(Expr, Expr)>),
    /// `body` is the predicate, or for `map` the transform (`pred` being its filter).
    Comp {
        kind: CompKind,
        target: Box<Expr>,
        var: String,
        pred: Option<Box<Expr>>,
        body: Box<Expr>,
    },
}

// ----- lexing

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Int(u64),
    Uint(u64),
    Double(f64),
    Str(String),
    Bool(bool),
    Null,
    Ident(String),
    Sym(&'static str),
    Eof,
}

const SYMS: [&str; 24] = [
    "==", "!=", "<=", ">=", "&&", "||", "<", ">", "!", "+", "-", "*", "/", "%", "?", ":", ".", ",",
    "(", ")", "[", "]", "{", "}",
];

const RESERVED: [&str; 17] = [
    "as",
    "break",
    "const",
    "continue",
    "else",
    "for",
    "function",
    "if",
    "import",
    "let",
    "loop",
    "package",
    "namespace",
    "return",
    "var",
    "void",
    "while",
];

fn location(src: &str, at: usize) -> (usize, usize) {
    let mut line = 1;
    let mut col = 1;
    for c in src.chars().take(at) {
        if c == '\n' {
            line += 1;
            col = 1;
        } else {
            col += 1;
        }
    }
    (line, col)
}

fn syntax_error(src: &str, at: usize, msg: &str) -> String {
    let (line, col) = location(src, at);
    format!("ERROR: <input>:{line}:{col}: Syntax error: {msg}")
}

fn check_error(src: &str, at: usize, msg: &str) -> String {
    let (line, col) = location(src, at);
    format!("ERROR: <input>:{line}:{col}: {msg}")
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Eof => "<EOF>".to_string(),
        Tok::Sym(s) => (*s).to_string(),
        Tok::Ident(s) => s.clone(),
        Tok::Int(i) => i.to_string(),
        Tok::Uint(u) => format!("{u}u"),
        Tok::Double(d) => d.to_string(),
        Tok::Str(s) => format!("{s:?}"),
        Tok::Bool(b) => b.to_string(),
        Tok::Null => "null".to_string(),
    }
}

fn tokenize(src: &str) -> Result<Vec<(Tok, usize)>, String> {
    let cs: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < cs.len() {
        let c = cs[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '/' && cs.get(i + 1) == Some(&'/') {
            while i < cs.len() && cs[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_digit() {
            let (tok, next) = lex_number(&cs, i).map_err(|m| syntax_error(src, start, &m))?;
            out.push((tok, start));
            i = next;
            continue;
        }
        if c == '"' || c == '\'' {
            let (s, next) = lex_string(&cs, i, false).map_err(|m| syntax_error(src, start, &m))?;
            out.push((Tok::Str(s), start));
            i = next;
            continue;
        }
        if c == '_' || c.is_ascii_alphabetic() {
            let mut j = i;
            while j < cs.len() && (cs[j] == '_' || cs[j].is_ascii_alphanumeric()) {
                j += 1;
            }
            let word: String = cs[i..j].iter().collect();
            let quote_follows = matches!(cs.get(j), Some('"' | '\''));
            if quote_follows && matches!(word.as_str(), "r" | "R") {
                let (s, next) =
                    lex_string(&cs, j, true).map_err(|m| syntax_error(src, start, &m))?;
                out.push((Tok::Str(s), start));
                i = next;
                continue;
            }
            if quote_follows && matches!(word.to_ascii_lowercase().as_str(), "b" | "rb" | "br") {
                return Err(syntax_error(
                    src,
                    start,
                    "bytes literals are not supported by kubesim's CEL subset",
                ));
            }
            let tok = match word.as_str() {
                "true" => Tok::Bool(true),
                "false" => Tok::Bool(false),
                "null" => Tok::Null,
                "in" => Tok::Sym("in"),
                w if RESERVED.contains(&w) => {
                    return Err(syntax_error(
                        src,
                        start,
                        &format!("reserved identifier: {w}"),
                    ));
                }
                _ => Tok::Ident(word),
            };
            out.push((tok, start));
            i = j;
            continue;
        }
        let sym = SYMS.iter().find(|s| {
            s.chars()
                .enumerate()
                .all(|(k, sc)| cs.get(i + k) == Some(&sc))
        });
        match sym {
            Some(s) => {
                out.push((Tok::Sym(s), start));
                i += s.chars().count();
            }
            None => {
                return Err(syntax_error(
                    src,
                    start,
                    &format!("token recognition error at: '{c}'"),
                ));
            }
        }
    }
    out.push((Tok::Eof, cs.len()));
    Ok(out)
}

fn lex_number(cs: &[char], start: usize) -> Result<(Tok, usize), String> {
    let mut i = start;
    let unsigned = |i: &mut usize| {
        if matches!(cs.get(*i), Some('u' | 'U')) {
            *i += 1;
            true
        } else {
            false
        }
    };
    if cs[i] == '0' && matches!(cs.get(i + 1), Some('x' | 'X')) {
        i += 2;
        let digits_start = i;
        while i < cs.len() && cs[i].is_ascii_hexdigit() {
            i += 1;
        }
        let digits: String = cs[digits_start..i].iter().collect();
        let v = u64::from_str_radix(&digits, 16).map_err(|_| "invalid int literal".to_string())?;
        let tok = if unsigned(&mut i) {
            Tok::Uint(v)
        } else {
            Tok::Int(v)
        };
        return Ok((tok, i));
    }
    while i < cs.len() && cs[i].is_ascii_digit() {
        i += 1;
    }
    let mut float = false;
    if cs.get(i) == Some(&'.') && cs.get(i + 1).is_some_and(char::is_ascii_digit) {
        float = true;
        i += 1;
        while i < cs.len() && cs[i].is_ascii_digit() {
            i += 1;
        }
    }
    if matches!(cs.get(i), Some('e' | 'E')) {
        let mut j = i + 1;
        if matches!(cs.get(j), Some('+' | '-')) {
            j += 1;
        }
        if cs.get(j).is_some_and(char::is_ascii_digit) {
            float = true;
            i = j;
            while i < cs.len() && cs[i].is_ascii_digit() {
                i += 1;
            }
        }
    }
    let text: String = cs[start..i].iter().collect();
    if float {
        let v: f64 = text
            .parse()
            .map_err(|_| "invalid double literal".to_string())?;
        return Ok((Tok::Double(v), i));
    }
    let v: u64 = text
        .parse()
        .map_err(|_| "invalid int literal".to_string())?;
    let tok = if unsigned(&mut i) {
        Tok::Uint(v)
    } else {
        Tok::Int(v)
    };
    Ok((tok, i))
}

fn lex_string(cs: &[char], start: usize, raw: bool) -> Result<(String, usize), String> {
    let q = cs[start];
    let triple = cs.get(start + 1) == Some(&q) && cs.get(start + 2) == Some(&q);
    let mut i = start + if triple { 3 } else { 1 };
    let mut out = String::new();
    loop {
        let Some(&c) = cs.get(i) else {
            return Err("unterminated string literal".to_string());
        };
        if c == q && (!triple || (cs.get(i + 1) == Some(&q) && cs.get(i + 2) == Some(&q))) {
            return Ok((out, i + if triple { 3 } else { 1 }));
        }
        if (c == '\n' || c == '\r') && !triple {
            return Err("unterminated string literal".to_string());
        }
        if c != '\\' || raw {
            out.push(c);
            i += 1;
            continue;
        }
        let Some(&e) = cs.get(i + 1) else {
            return Err("unterminated string literal".to_string());
        };
        i += 2;
        let simple = match e {
            '\\' => Some('\\'),
            '\'' => Some('\''),
            '"' => Some('"'),
            '`' => Some('`'),
            '?' => Some('?'),
            'a' => Some('\u{7}'),
            'b' => Some('\u{8}'),
            'f' => Some('\u{c}'),
            'n' => Some('\n'),
            'r' => Some('\r'),
            't' => Some('\t'),
            'v' => Some('\u{b}'),
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            continue;
        }
        let (radix, len) = match e {
            'x' | 'X' => (16, 2),
            'u' => (16, 4),
            'U' => (16, 8),
            '0'..='3' => {
                i -= 1;
                (8, 3)
            }
            _ => return Err(format!("invalid escape sequence '\\{e}'")),
        };
        let digits: String = cs.get(i..i + len).unwrap_or_default().iter().collect();
        let code = u32::from_str_radix(&digits, radix)
            .ok()
            .filter(|_| digits.chars().count() == len)
            .and_then(char::from_u32)
            .ok_or_else(|| format!("invalid escape sequence '\\{e}{digits}'"))?;
        out.push(code);
        i += len;
    }
}

// ----- parsing

struct Parser<'a> {
    src: &'a str,
    toks: Vec<(Tok, usize)>,
    pos: usize,
    depth: u32,
    eof: Tok,
}

pub(super) fn parse(src: &str) -> Result<Expr, String> {
    let toks = tokenize(src)?;
    let mut p = Parser {
        src,
        toks,
        pos: 0,
        depth: 0,
        eof: Tok::Eof,
    };
    let e = p.expr()?;
    if *p.peek() != Tok::Eof {
        return Err(p.err(&format!(
            "extraneous input '{}' expecting <EOF>",
            describe(p.peek())
        )));
    }
    Ok(e)
}

pub(super) fn compile_regex(pattern: &str) -> Result<Regex, String> {
    super::go_regex(pattern).map_err(|e| format!("invalid regular expression: {e}"))
}

impl Parser<'_> {
    fn peek(&self) -> &Tok {
        self.toks.get(self.pos).map_or(&self.eof, |t| &t.0)
    }

    fn at(&self) -> usize {
        self.toks.get(self.pos).map_or(0, |t| t.1)
    }

    fn bump(&mut self) -> Tok {
        let t = self.peek().clone();
        if self.pos < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn eat(&mut self, s: &str) -> bool {
        if matches!(self.peek(), Tok::Sym(x) if *x == s) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_sym(&mut self, s: &str) -> Result<(), String> {
        if self.eat(s) {
            Ok(())
        } else {
            Err(self.err(&format!(
                "mismatched input '{}' expecting '{s}'",
                describe(self.peek())
            )))
        }
    }

    fn err(&self, msg: &str) -> String {
        syntax_error(self.src, self.at(), msg)
    }

    fn expr(&mut self) -> Result<Expr, String> {
        self.depth += 1;
        if self.depth > 200 {
            return Err(self.err("expression recursion limit exceeded"));
        }
        let r = self.conditional();
        self.depth -= 1;
        r
    }

    fn conditional(&mut self) -> Result<Expr, String> {
        let c = self.or()?;
        if !self.eat("?") {
            return Ok(c);
        }
        let a = self.or()?;
        self.expect_sym(":")?;
        let b = self.expr()?;
        Ok(Expr::Cond(Box::new(c), Box::new(a), Box::new(b)))
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut l = self.and()?;
        while self.eat("||") {
            let r = self.and()?;
            l = Expr::Or(Box::new(l), Box::new(r));
        }
        Ok(l)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut l = self.rel()?;
        while self.eat("&&") {
            let r = self.rel()?;
            l = Expr::And(Box::new(l), Box::new(r));
        }
        Ok(l)
    }

    fn rel(&mut self) -> Result<Expr, String> {
        let mut l = self.add()?;
        loop {
            let op = match self.peek() {
                Tok::Sym("==") => BinOp::Eq,
                Tok::Sym("!=") => BinOp::Ne,
                Tok::Sym("<") => BinOp::Lt,
                Tok::Sym("<=") => BinOp::Le,
                Tok::Sym(">") => BinOp::Gt,
                Tok::Sym(">=") => BinOp::Ge,
                Tok::Sym("in") => BinOp::In,
                _ => return Ok(l),
            };
            self.pos += 1;
            let r = self.add()?;
            l = Expr::Bin(op, Box::new(l), Box::new(r));
        }
    }

    fn add(&mut self) -> Result<Expr, String> {
        let mut l = self.mul()?;
        loop {
            let op = match self.peek() {
                Tok::Sym("+") => BinOp::Add,
                Tok::Sym("-") => BinOp::Sub,
                _ => return Ok(l),
            };
            self.pos += 1;
            let r = self.mul()?;
            l = Expr::Bin(op, Box::new(l), Box::new(r));
        }
    }

    fn mul(&mut self) -> Result<Expr, String> {
        let mut l = self.unary()?;
        loop {
            let op = match self.peek() {
                Tok::Sym("*") => BinOp::Mul,
                Tok::Sym("/") => BinOp::Div,
                Tok::Sym("%") => BinOp::Rem,
                _ => return Ok(l),
            };
            self.pos += 1;
            let r = self.unary()?;
            l = Expr::Bin(op, Box::new(l), Box::new(r));
        }
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.eat("!") {
            let e = self.unary()?;
            return Ok(Expr::Not(Box::new(e)));
        }
        if self.eat("-") {
            // Fold negative int literals so that -9223372036854775808 is expressible.
            if let Tok::Int(u) = *self.peek() {
                let at = self.at();
                self.pos += 1;
                let v = if u == 1 << 63 {
                    i64::MIN
                } else {
                    i64::try_from(u)
                        .map(|v| -v)
                        .map_err(|_| syntax_error(self.src, at, "invalid int literal"))?
                };
                return self.suffix(Expr::Lit(Lit::Int(v)));
            }
            let e = self.unary()?;
            return Ok(Expr::Neg(Box::new(e)));
        }
        let p = self.primary()?;
        self.suffix(p)
    }

    fn suffix(&mut self, mut e: Expr) -> Result<Expr, String> {
        loop {
            if self.eat(".") {
                let at = self.at();
                let name = match self.bump() {
                    Tok::Ident(n) => n,
                    t => {
                        return Err(syntax_error(
                            self.src,
                            at,
                            &format!("mismatched input '{}' expecting IDENTIFIER", describe(&t)),
                        ));
                    }
                };
                if self.eat("(") {
                    let args = self.args(")")?;
                    e = self.method(e, name, args, at)?;
                } else {
                    e = Expr::Select(Box::new(e), name);
                }
            } else if self.eat("[") {
                let i = self.expr()?;
                self.expect_sym("]")?;
                e = Expr::Index(Box::new(e), Box::new(i));
            } else {
                return Ok(e);
            }
        }
    }

    fn args(&mut self, close: &str) -> Result<Vec<Expr>, String> {
        let mut v = Vec::new();
        if self.eat(close) {
            return Ok(v);
        }
        loop {
            v.push(self.expr()?);
            if self.eat(",") {
                if self.eat(close) {
                    return Ok(v);
                }
                continue;
            }
            self.expect_sym(close)?;
            return Ok(v);
        }
    }

    fn primary(&mut self) -> Result<Expr, String> {
        let at = self.at();
        match self.bump() {
            Tok::Int(u) => i64::try_from(u)
                .map(|i| Expr::Lit(Lit::Int(i)))
                .map_err(|_| syntax_error(self.src, at, "invalid int literal")),
            Tok::Uint(u) => Ok(Expr::Lit(Lit::Uint(u))),
            Tok::Double(d) => Ok(Expr::Lit(Lit::Double(d))),
            Tok::Str(s) => Ok(Expr::Lit(Lit::Str(s))),
            Tok::Bool(b) => Ok(Expr::Lit(Lit::Bool(b))),
            Tok::Null => Ok(Expr::Lit(Lit::Null)),
            Tok::Ident(name) => self.ident(name, at),
            Tok::Sym(".") => match self.bump() {
                Tok::Ident(name) => self.ident(name, at),
                t => Err(syntax_error(
                    self.src,
                    at,
                    &format!("mismatched input '{}' expecting IDENTIFIER", describe(&t)),
                )),
            },
            Tok::Sym("(") => {
                let e = self.expr()?;
                self.expect_sym(")")?;
                Ok(e)
            }
            Tok::Sym("[") => Ok(Expr::List(self.args("]")?)),
            Tok::Sym("{") => {
                let mut entries = Vec::new();
                if self.eat("}") {
                    return Ok(Expr::Map(entries));
                }
                loop {
                    let k = self.expr()?;
                    self.expect_sym(":")?;
                    let v = self.expr()?;
                    entries.push((k, v));
                    if self.eat(",") {
                        if self.eat("}") {
                            return Ok(Expr::Map(entries));
                        }
                        continue;
                    }
                    self.expect_sym("}")?;
                    return Ok(Expr::Map(entries));
                }
            }
            t => Err(syntax_error(
                self.src,
                at,
                &format!(
                    "mismatched input '{}' expecting an expression",
                    describe(&t)
                ),
            )),
        }
    }

    fn ident(&mut self, name: String, at: usize) -> Result<Expr, String> {
        if !self.eat("(") {
            return Ok(Expr::Ident(name));
        }
        let mut args = self.args(")")?;
        match (name.as_str(), args.len()) {
            ("has", 1) => match args.pop() {
                Some(Expr::Select(t, f)) => Ok(Expr::Has(t, f)),
                _ => Err(check_error(self.src, at, "invalid argument to has() macro")),
            },
            ("matches", 2) => {
                if let Some(Expr::Lit(Lit::Str(p))) = args.get(1) {
                    let re = compile_regex(p).map_err(|e| check_error(self.src, at, &e))?;
                    let target = args.swap_remove(0);
                    return Ok(Expr::Matches(Box::new(target), re));
                }
                Ok(Expr::Call {
                    target: None,
                    name,
                    args,
                })
            }
            ("size" | "int" | "uint" | "double" | "string" | "bool" | "dyn", 1) => Ok(Expr::Call {
                target: None,
                name,
                args,
            }),
            _ => Err(check_error(
                self.src,
                at,
                &format!("undeclared reference to '{name}' (in container '')"),
            )),
        }
    }

    fn method(
        &self,
        target: Expr,
        name: String,
        args: Vec<Expr>,
        at: usize,
    ) -> Result<Expr, String> {
        let kind = match name.as_str() {
            "all" => Some(CompKind::All),
            "exists" => Some(CompKind::Exists),
            "exists_one" => Some(CompKind::ExistsOne),
            "map" => Some(CompKind::Map),
            "filter" => Some(CompKind::Filter),
            _ => None,
        };
        if let Some(kind) = kind {
            let arity_ok = args.len() == 2 || (kind == CompKind::Map && args.len() == 3);
            if !arity_ok {
                return Err(check_error(
                    self.src,
                    at,
                    &format!("found no matching overload for '{name}'"),
                ));
            }
            let mut it = args.into_iter();
            let var = match it.next() {
                Some(Expr::Ident(v)) => v,
                _ => return Err(check_error(self.src, at, "argument must be a simple name")),
            };
            let (pred, body) = match (it.next(), it.next()) {
                (Some(p), Some(t)) => (Some(Box::new(p)), t),
                (Some(b), None) => (None, b),
                _ => return Err(check_error(self.src, at, "missing macro argument")),
            };
            return Ok(Expr::Comp {
                kind,
                target: Box::new(target),
                var,
                pred,
                body: Box::new(body),
            });
        }
        match (name.as_str(), args.as_slice()) {
            ("matches", [Expr::Lit(Lit::Str(p))]) => {
                let re = compile_regex(p).map_err(|e| check_error(self.src, at, &e))?;
                Ok(Expr::Matches(Box::new(target), re))
            }
            ("size" | "lowerAscii" | "upperAscii" | "trim", [])
            | ("startsWith" | "endsWith" | "contains" | "matches", [_])
            | ("join", [] | [_]) => Ok(Expr::Call {
                target: Some(Box::new(target)),
                name,
                args,
            }),
            _ => Err(check_error(
                self.src,
                at,
                &format!("undeclared reference to '{name}' (in container '')"),
            )),
        }
    }
}

/// Rejects names other than `self`, `oldSelf` and comprehension variables; returns
/// whether `oldSelf` is used, which makes the rule a transition rule.
pub(super) fn check(e: &Expr) -> Result<bool, String> {
    let mut bound = Vec::new();
    let mut uses_old = false;
    check_in(e, &mut bound, &mut uses_old)?;
    Ok(uses_old)
}

fn check_in(e: &Expr, bound: &mut Vec<String>, uses_old: &mut bool) -> Result<(), String> {
    match e {
        Expr::Lit(_) => Ok(()),
        Expr::Ident(n) => {
            if bound.iter().any(|b| b == n) || n == "self" {
                Ok(())
            } else if n == "oldSelf" {
                *uses_old = true;
                Ok(())
            } else {
                Err(format!(
                    "ERROR: <input>: undeclared reference to '{n}' (in container '')"
                ))
            }
        }
        Expr::Select(t, _)
        | Expr::Has(t, _)
        | Expr::Matches(t, _)
        | Expr::Not(t)
        | Expr::Neg(t) => check_in(t, bound, uses_old),
        Expr::Index(a, b) | Expr::Bin(_, a, b) | Expr::And(a, b) | Expr::Or(a, b) => {
            check_in(a, bound, uses_old)?;
            check_in(b, bound, uses_old)
        }
        Expr::Cond(a, b, c) => {
            check_in(a, bound, uses_old)?;
            check_in(b, bound, uses_old)?;
            check_in(c, bound, uses_old)
        }
        Expr::Call { target, args, .. } => {
            if let Some(t) = target {
                check_in(t, bound, uses_old)?;
            }
            args.iter().try_for_each(|a| check_in(a, bound, uses_old))
        }
        Expr::List(xs) => xs.iter().try_for_each(|x| check_in(x, bound, uses_old)),
        Expr::Map(kvs) => kvs.iter().try_for_each(|(k, v)| {
            check_in(k, bound, uses_old)?;
            check_in(v, bound, uses_old)
        }),
        Expr::Comp {
            target,
            var,
            pred,
            body,
            ..
        } => {
            check_in(target, bound, uses_old)?;
            bound.push(var.clone());
            let r = pred
                .iter()
                .try_for_each(|p| check_in(p, bound, uses_old))
                .and_then(|()| check_in(body, bound, uses_old));
            bound.pop();
            r
        }
    }
}

// ----- evaluation

#[derive(Debug, Clone)]
pub(super) enum Val {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Double(f64),
    Str(Rc<str>),
    List(Rc<Vec<Val>>),
    /// Insertion-ordered entries; CEL maps from JSON objects are small.
    Map(Rc<Vec<(Val, Val)>>),
    /// Data under x-kubernetes-preserve-unknown-fields with no type: equality only.
    Opaque(Rc<Value>),
}

pub(super) fn str_val(s: &str) -> Val {
    Val::Str(Rc::from(s))
}

pub(super) struct Env<'a> {
    self_val: &'a Val,
    old: Option<&'a Val>,
    locals: Vec<(String, Val)>,
}

impl<'a> Env<'a> {
    pub(super) fn new(self_val: &'a Val, old: Option<&'a Val>) -> Self {
        Env {
            self_val,
            old,
            locals: Vec::new(),
        }
    }
}

fn no_overload<T>() -> Result<T, String> {
    Err(NO_OVERLOAD.to_string())
}

fn lit(l: &Lit) -> Val {
    match l {
        Lit::Null => Val::Null,
        Lit::Bool(b) => Val::Bool(*b),
        Lit::Int(i) => Val::Int(*i),
        Lit::Uint(u) => Val::Uint(*u),
        Lit::Double(d) => Val::Double(*d),
        Lit::Str(s) => str_val(s),
    }
}

/// CEL escapes property names that are not identifiers (`__dash__`, `__dot__`, ...).
fn unescape_field(name: &str) -> Option<String> {
    if !name.contains("__") {
        return None;
    }
    if let Some(inner) = name.strip_prefix("__").and_then(|n| n.strip_suffix("__"))
        && (RESERVED.contains(&inner) || matches!(inner, "true" | "false" | "null" | "in"))
    {
        return Some(inner.to_string());
    }
    Some(
        name.replace("__underscores__", "\u{0}")
            .replace("__dot__", ".")
            .replace("__dash__", "-")
            .replace("__slash__", "/")
            .replace('\u{0}', "__"),
    )
}

fn field<'v>(m: &'v [(Val, Val)], name: &str) -> Option<&'v Val> {
    let find = |n: &str| {
        m.iter()
            .find(|(k, _)| matches!(k, Val::Str(s) if &**s == n))
            .map(|(_, v)| v)
    };
    find(name).or_else(|| unescape_field(name).and_then(|n| find(&n)))
}

fn key_text(v: &Val) -> String {
    match v {
        Val::Str(s) => s.to_string(),
        Val::Int(i) => i.to_string(),
        Val::Uint(u) => u.to_string(),
        Val::Bool(b) => b.to_string(),
        Val::Double(d) => super::go_float(*d),
        _ => "?".to_string(),
    }
}

pub(super) fn eval(e: &Expr, env: &mut Env<'_>) -> Result<Val, String> {
    match e {
        Expr::Lit(l) => Ok(lit(l)),
        Expr::Ident(n) => {
            if let Some((_, v)) = env.locals.iter().rev().find(|(name, _)| name == n) {
                return Ok(v.clone());
            }
            match n.as_str() {
                "self" => Ok(env.self_val.clone()),
                "oldSelf" => env
                    .old
                    .cloned()
                    .ok_or_else(|| "no such attribute: oldSelf".to_string()),
                _ => Err(format!("no such attribute: {n}")),
            }
        }
        Expr::Select(t, f) => match eval(t, env)? {
            Val::Map(m) => field(&m, f)
                .cloned()
                .ok_or_else(|| format!("no such key: {f}")),
            _ => no_overload(),
        },
        Expr::Has(t, f) => match eval(t, env)? {
            Val::Map(m) => Ok(Val::Bool(field(&m, f).is_some())),
            _ => no_overload(),
        },
        Expr::Index(t, i) => {
            let t = eval(t, env)?;
            let i = eval(i, env)?;
            index(&t, &i)
        }
        Expr::Call { target, name, args } => call(target.as_deref(), name, args, env),
        Expr::Matches(t, re) => match eval(t, env)? {
            Val::Str(s) => Ok(Val::Bool(re.is_match(&s))),
            _ => no_overload(),
        },
        Expr::Not(x) => match eval(x, env)? {
            Val::Bool(b) => Ok(Val::Bool(!b)),
            _ => no_overload(),
        },
        Expr::Neg(x) => match eval(x, env)? {
            Val::Int(i) => i
                .checked_neg()
                .map(Val::Int)
                .ok_or_else(|| "integer overflow".to_string()),
            Val::Double(d) => Ok(Val::Double(-d)),
            _ => no_overload(),
        },
        Expr::Bin(op, a, b) => {
            let a = eval(a, env)?;
            let b = eval(b, env)?;
            binop(*op, &a, &b)
        }
        Expr::And(a, b) => logic(a, b, false, env),
        Expr::Or(a, b) => logic(a, b, true, env),
        Expr::Cond(c, a, b) => match eval(c, env)? {
            Val::Bool(true) => eval(a, env),
            Val::Bool(false) => eval(b, env),
            _ => no_overload(),
        },
        Expr::List(xs) => {
            let mut out = Vec::with_capacity(xs.len());
            for x in xs {
                out.push(eval(x, env)?);
            }
            Ok(Val::List(Rc::new(out)))
        }
        Expr::Map(kvs) => {
            let mut out: Vec<(Val, Val)> = Vec::with_capacity(kvs.len());
            for (k, v) in kvs {
                let k = eval(k, env)?;
                if !matches!(k, Val::Str(_) | Val::Int(_) | Val::Uint(_) | Val::Bool(_)) {
                    return Err(format!("unsupported key type: {}", key_text(&k)));
                }
                if out.iter().any(|(existing, _)| equal(existing, &k)) {
                    return Err(format!("Failed with repeated key: {}", key_text(&k)));
                }
                let v = eval(v, env)?;
                out.push((k, v));
            }
            Ok(Val::Map(Rc::new(out)))
        }
        Expr::Comp {
            kind,
            target,
            var,
            pred,
            body,
        } => comprehension(*kind, target, var, pred.as_deref(), body, env),
    }
}

/// CEL's `&&`/`||` are commutative over errors: `false && error` and `error && false` are
/// both false; an error only surfaces when the other side does not decide the result.
fn logic(a: &Expr, b: &Expr, decisive: bool, env: &mut Env<'_>) -> Result<Val, String> {
    let av = eval(a, env);
    if let Ok(Val::Bool(x)) = &av
        && *x == decisive
    {
        return Ok(Val::Bool(decisive));
    }
    let bv = eval(b, env);
    if let Ok(Val::Bool(y)) = &bv
        && *y == decisive
    {
        return Ok(Val::Bool(decisive));
    }
    match (av, bv) {
        (Ok(Val::Bool(_)), Ok(Val::Bool(_))) => Ok(Val::Bool(!decisive)),
        (Err(e), _) | (_, Err(e)) => Err(e),
        _ => no_overload(),
    }
}

fn with_local(env: &mut Env<'_>, var: &str, item: Val, e: &Expr) -> Result<Val, String> {
    env.locals.push((var.to_string(), item));
    let r = eval(e, env);
    env.locals.pop();
    r
}

fn comprehension(
    kind: CompKind,
    target: &Expr,
    var: &str,
    pred: Option<&Expr>,
    body: &Expr,
    env: &mut Env<'_>,
) -> Result<Val, String> {
    let items: Vec<Val> = match eval(target, env)? {
        Val::List(l) => l.as_ref().clone(),
        Val::Map(m) => m.iter().map(|(k, _)| k.clone()).collect(),
        _ => return no_overload(),
    };
    match kind {
        CompKind::All | CompKind::Exists => {
            let decisive = kind == CompKind::Exists;
            let mut err = None;
            for item in items {
                match with_local(env, var, item, body) {
                    Ok(Val::Bool(b)) if b == decisive => return Ok(Val::Bool(decisive)),
                    Ok(Val::Bool(_)) => {}
                    Ok(_) => {
                        err.get_or_insert_with(|| NO_OVERLOAD.to_string());
                    }
                    Err(e) => {
                        err.get_or_insert(e);
                    }
                }
            }
            match err {
                Some(e) => Err(e),
                None => Ok(Val::Bool(!decisive)),
            }
        }
        CompKind::ExistsOne => {
            let mut n = 0;
            for item in items {
                match with_local(env, var, item, body)? {
                    Val::Bool(true) => n += 1,
                    Val::Bool(false) => {}
                    _ => return no_overload(),
                }
            }
            Ok(Val::Bool(n == 1))
        }
        CompKind::Filter => {
            let mut out = Vec::new();
            for item in items {
                match with_local(env, var, item.clone(), body)? {
                    Val::Bool(true) => out.push(item),
                    Val::Bool(false) => {}
                    _ => return no_overload(),
                }
            }
            Ok(Val::List(Rc::new(out)))
        }
        CompKind::Map => {
            let mut out = Vec::new();
            for item in items {
                if let Some(p) = pred {
                    match with_local(env, var, item.clone(), p)? {
                        Val::Bool(true) => {}
                        Val::Bool(false) => continue,
                        _ => return no_overload(),
                    }
                }
                out.push(with_local(env, var, item, body)?);
            }
            Ok(Val::List(Rc::new(out)))
        }
    }
}

fn index(t: &Val, i: &Val) -> Result<Val, String> {
    match t {
        Val::List(l) => {
            let idx = match i {
                Val::Int(i) => *i,
                Val::Uint(u) => i64::try_from(*u).unwrap_or(i64::MAX),
                _ => return no_overload(),
            };
            usize::try_from(idx)
                .ok()
                .and_then(|n| l.get(n))
                .cloned()
                .ok_or_else(|| format!("index out of bounds: {idx}"))
        }
        Val::Map(m) => m
            .iter()
            .find(|(k, _)| equal(k, i))
            .map(|(_, v)| v.clone())
            .ok_or_else(|| format!("no such key: {}", key_text(i))),
        _ => no_overload(),
    }
}

fn call(
    target: Option<&Expr>,
    name: &str,
    args: &[Expr],
    env: &mut Env<'_>,
) -> Result<Val, String> {
    let t = match target {
        Some(t) => Some(eval(t, env)?),
        None => None,
    };
    let mut vals = Vec::with_capacity(args.len());
    for a in args {
        vals.push(eval(a, env)?);
    }
    let b = |v: bool| Ok(Val::Bool(v));
    match (name, t.as_ref(), vals.as_slice()) {
        ("size", Some(x), []) | ("size", None, [x]) => match x {
            Val::Str(s) => Ok(Val::Int(
                i64::try_from(s.chars().count()).unwrap_or(i64::MAX),
            )),
            Val::List(l) => Ok(Val::Int(i64::try_from(l.len()).unwrap_or(i64::MAX))),
            Val::Map(m) => Ok(Val::Int(i64::try_from(m.len()).unwrap_or(i64::MAX))),
            _ => no_overload(),
        },
        ("startsWith", Some(Val::Str(s)), [Val::Str(p)]) => b(s.starts_with(&**p)),
        ("endsWith", Some(Val::Str(s)), [Val::Str(p)]) => b(s.ends_with(&**p)),
        ("contains", Some(Val::Str(s)), [Val::Str(p)]) => b(s.contains(&**p)),
        ("matches", Some(Val::Str(s)), [Val::Str(p)])
        | ("matches", None, [Val::Str(s), Val::Str(p)]) => b(compile_regex(p)?.is_match(s)),
        ("lowerAscii", Some(Val::Str(s)), []) => Ok(str_val(&s.to_ascii_lowercase())),
        ("upperAscii", Some(Val::Str(s)), []) => Ok(str_val(&s.to_ascii_uppercase())),
        ("trim", Some(Val::Str(s)), []) => Ok(str_val(s.trim())),
        ("join", Some(Val::List(l)), rest) => {
            let sep = match rest {
                [] => "",
                [Val::Str(sep)] => &**sep,
                _ => return no_overload(),
            };
            let mut parts = Vec::with_capacity(l.len());
            for x in l.iter() {
                match x {
                    Val::Str(s) => parts.push(s.to_string()),
                    _ => return no_overload(),
                }
            }
            Ok(str_val(&parts.join(sep)))
        }
        ("int", None, [x]) => to_int(x),
        ("uint", None, [x]) => to_uint(x),
        ("double", None, [x]) => match x {
            Val::Int(i) => Ok(Val::Double(*i as f64)),
            Val::Uint(u) => Ok(Val::Double(*u as f64)),
            Val::Double(d) => Ok(Val::Double(*d)),
            Val::Str(s) => s
                .parse()
                .map(Val::Double)
                .map_err(|_| format!("cannot convert '{s}' to double")),
            _ => no_overload(),
        },
        ("string", None, [x]) => match x {
            Val::Str(_) => Ok(x.clone()),
            Val::Int(i) => Ok(str_val(&i.to_string())),
            Val::Uint(u) => Ok(str_val(&u.to_string())),
            Val::Double(d) => Ok(str_val(&super::go_float(*d))),
            Val::Bool(v) => Ok(str_val(&v.to_string())),
            _ => no_overload(),
        },
        ("bool", None, [x]) => match x {
            Val::Bool(_) => Ok(x.clone()),
            Val::Str(s) => match &**s {
                "1" | "t" | "true" | "TRUE" | "True" => b(true),
                "0" | "f" | "false" | "FALSE" | "False" => b(false),
                _ => Err(format!(
                    "type conversion error from 'string' to 'bool': {s}"
                )),
            },
            _ => no_overload(),
        },
        ("dyn", None, [x]) => Ok(x.clone()),
        _ => no_overload(),
    }
}

fn to_int(x: &Val) -> Result<Val, String> {
    let overflow = || "integer overflow".to_string();
    match x {
        Val::Int(i) => Ok(Val::Int(*i)),
        Val::Uint(u) => i64::try_from(*u).map(Val::Int).map_err(|_| overflow()),
        Val::Double(d) => {
            if d.is_finite() && *d > -9.223_372_036_854_776e18 && *d < 9.223_372_036_854_776e18 {
                Ok(Val::Int(d.trunc() as i64))
            } else {
                Err(overflow())
            }
        }
        Val::Str(s) => s
            .parse()
            .map(Val::Int)
            .map_err(|_| format!("cannot convert '{s}' to int")),
        _ => no_overload(),
    }
}

fn to_uint(x: &Val) -> Result<Val, String> {
    let overflow = || "unsigned integer overflow".to_string();
    match x {
        Val::Uint(u) => Ok(Val::Uint(*u)),
        Val::Int(i) => u64::try_from(*i).map(Val::Uint).map_err(|_| overflow()),
        Val::Double(d) => {
            if d.is_finite() && *d >= 0.0 && *d < 1.844_674_407_370_955_2e19 {
                Ok(Val::Uint(d.trunc() as u64))
            } else {
                Err(overflow())
            }
        }
        Val::Str(s) => s
            .parse()
            .map(Val::Uint)
            .map_err(|_| format!("cannot convert '{s}' to uint")),
        _ => no_overload(),
    }
}

#[derive(Clone, Copy)]
enum Num {
    I(i64),
    U(u64),
    D(f64),
}

fn num(v: &Val) -> Option<Num> {
    match v {
        Val::Int(i) => Some(Num::I(*i)),
        Val::Uint(u) => Some(Num::U(*u)),
        Val::Double(d) => Some(Num::D(*d)),
        _ => None,
    }
}

/// Numeric comparison across int, uint and double, as CEL's heterogeneous comparisons.
fn num_cmp(a: Num, b: Num) -> Option<Ordering> {
    match (a, b) {
        (Num::I(x), Num::I(y)) => Some(x.cmp(&y)),
        (Num::U(x), Num::U(y)) => Some(x.cmp(&y)),
        (Num::I(x), Num::U(y)) => Some(i128::from(x).cmp(&i128::from(y))),
        (Num::U(x), Num::I(y)) => Some(i128::from(x).cmp(&i128::from(y))),
        (Num::D(x), Num::D(y)) => x.partial_cmp(&y),
        (Num::I(x), Num::D(y)) => (x as f64).partial_cmp(&y),
        (Num::U(x), Num::D(y)) => (x as f64).partial_cmp(&y),
        (Num::D(x), Num::I(y)) => x.partial_cmp(&(y as f64)),
        (Num::D(x), Num::U(y)) => x.partial_cmp(&(y as f64)),
    }
}

fn to_json(v: &Val) -> Option<Value> {
    Some(match v {
        Val::Null => Value::Null,
        Val::Bool(b) => Value::Bool(*b),
        Val::Int(i) => Value::from(*i),
        Val::Uint(u) => Value::from(*u),
        Val::Double(d) => Value::Number(serde_json::Number::from_f64(*d)?),
        Val::Str(s) => Value::String(s.to_string()),
        Val::List(l) => Value::Array(l.iter().map(to_json).collect::<Option<_>>()?),
        Val::Map(m) => Value::Object(
            m.iter()
                .map(|(k, v)| match k {
                    Val::Str(k) => Some((k.to_string(), to_json(v)?)),
                    _ => None,
                })
                .collect::<Option<_>>()?,
        ),
        Val::Opaque(o) => o.as_ref().clone(),
    })
}

/// CEL equality: heterogeneous values are unequal rather than an error, and numbers
/// compare by value across int, uint and double.
pub(super) fn equal(a: &Val, b: &Val) -> bool {
    if let (Some(x), Some(y)) = (num(a), num(b)) {
        return num_cmp(x, y) == Some(Ordering::Equal);
    }
    match (a, b) {
        (Val::Null, Val::Null) => true,
        (Val::Bool(x), Val::Bool(y)) => x == y,
        (Val::Str(x), Val::Str(y)) => x == y,
        (Val::List(x), Val::List(y)) => {
            x.len() == y.len() && x.iter().zip(y.iter()).all(|(p, q)| equal(p, q))
        }
        (Val::Map(x), Val::Map(y)) => {
            x.len() == y.len()
                && x.iter().all(|(k, v)| {
                    y.iter()
                        .find(|(k2, _)| equal(k, k2))
                        .is_some_and(|(_, v2)| equal(v, v2))
                })
        }
        (Val::Opaque(x), other) | (other, Val::Opaque(x)) => {
            to_json(other).is_some_and(|o| o == **x)
        }
        _ => false,
    }
}

fn compare(a: &Val, b: &Val) -> Result<Option<Ordering>, String> {
    match (a, b) {
        (Val::Str(x), Val::Str(y)) => Ok(Some(x.cmp(y))),
        (Val::Bool(x), Val::Bool(y)) => Ok(Some(x.cmp(y))),
        _ => match (num(a), num(b)) {
            (Some(x), Some(y)) => Ok(num_cmp(x, y)),
            _ => no_overload(),
        },
    }
}

fn binop(op: BinOp, a: &Val, b: &Val) -> Result<Val, String> {
    let overflow = || "integer overflow".to_string();
    let uoverflow = || "unsigned integer overflow".to_string();
    match op {
        BinOp::Eq => Ok(Val::Bool(equal(a, b))),
        BinOp::Ne => Ok(Val::Bool(!equal(a, b))),
        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
            let r = compare(a, b)?.is_some_and(|o| match op {
                BinOp::Lt => o == Ordering::Less,
                BinOp::Le => o != Ordering::Greater,
                BinOp::Gt => o == Ordering::Greater,
                _ => o != Ordering::Less,
            });
            Ok(Val::Bool(r))
        }
        BinOp::In => match b {
            Val::List(l) => Ok(Val::Bool(l.iter().any(|x| equal(a, x)))),
            Val::Map(m) => Ok(Val::Bool(m.iter().any(|(k, _)| equal(a, k)))),
            _ => no_overload(),
        },
        BinOp::Add => match (a, b) {
            (Val::Int(x), Val::Int(y)) => x.checked_add(*y).map(Val::Int).ok_or_else(overflow),
            (Val::Uint(x), Val::Uint(y)) => x.checked_add(*y).map(Val::Uint).ok_or_else(uoverflow),
            (Val::Double(x), Val::Double(y)) => Ok(Val::Double(x + y)),
            (Val::Str(x), Val::Str(y)) => Ok(str_val(&format!("{x}{y}"))),
            (Val::List(x), Val::List(y)) => Ok(Val::List(Rc::new(
                x.iter().chain(y.iter()).cloned().collect(),
            ))),
            _ => no_overload(),
        },
        BinOp::Sub => match (a, b) {
            (Val::Int(x), Val::Int(y)) => x.checked_sub(*y).map(Val::Int).ok_or_else(overflow),
            (Val::Uint(x), Val::Uint(y)) => x.checked_sub(*y).map(Val::Uint).ok_or_else(uoverflow),
            (Val::Double(x), Val::Double(y)) => Ok(Val::Double(x - y)),
            _ => no_overload(),
        },
        BinOp::Mul => match (a, b) {
            (Val::Int(x), Val::Int(y)) => x.checked_mul(*y).map(Val::Int).ok_or_else(overflow),
            (Val::Uint(x), Val::Uint(y)) => x.checked_mul(*y).map(Val::Uint).ok_or_else(uoverflow),
            (Val::Double(x), Val::Double(y)) => Ok(Val::Double(x * y)),
            _ => no_overload(),
        },
        BinOp::Div => match (a, b) {
            (Val::Int(_), Val::Int(0)) | (Val::Uint(_), Val::Uint(0)) => {
                Err("division by zero".to_string())
            }
            (Val::Int(x), Val::Int(y)) => x.checked_div(*y).map(Val::Int).ok_or_else(overflow),
            (Val::Uint(x), Val::Uint(y)) => Ok(Val::Uint(x / y)),
            (Val::Double(x), Val::Double(y)) => Ok(Val::Double(x / y)),
            _ => no_overload(),
        },
        BinOp::Rem => match (a, b) {
            (Val::Int(_), Val::Int(0)) | (Val::Uint(_), Val::Uint(0)) => {
                Err("modulus by zero".to_string())
            }
            (Val::Int(x), Val::Int(y)) => x.checked_rem(*y).map(Val::Int).ok_or_else(overflow),
            (Val::Uint(x), Val::Uint(y)) => Ok(Val::Uint(x % y)),
            _ => no_overload(),
        },
    }
}
