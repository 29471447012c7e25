//! Incremental UTF-8 validation (RFC 3629) of text messages as they stream past.
//!
//! RFC 6455 §8.1 has an endpoint fail the connection with 1007 as soon as a text message is not
//! valid UTF-8, and the server does not keep a client's messages: so the check runs over each
//! piece of payload as it is read, carrying between pieces (reads, frames of one fragmented
//! message) only where it stands in one partial character: how many continuation bytes are
//! still due and the range the next one must fall in. That is the whole state; nothing of the
//! message is buffered.
//!
//! It fails fast: a byte that cannot continue any valid sequence (an overlong form, a surrogate,
//! a code point past U+10FFFF, a stray continuation byte) is an error at once, in the middle of
//! a frame, without waiting for the message to end.

/// Where the check stands between two pieces of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utf8Check {
    /// Continuation bytes still due for the character in progress (0 to 3).
    due: u8,
    /// The range the next continuation byte must fall in. Only the first continuation byte of
    /// some leads is narrower than `0x80..=0xBF`: that is how overlong forms, surrogates and
    /// code points past U+10FFFF are refused at their second byte.
    low: u8,
    high: u8,
}

/// The bytes seen so far cannot begin any valid UTF-8 text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

impl Default for Utf8Check {
    fn default() -> Self {
        Utf8Check::new()
    }
}

impl Utf8Check {
    pub const fn new() -> Utf8Check {
        Utf8Check {
            due: 0,
            low: 0x80,
            high: 0xBF,
        }
    }

    /// Checks the next piece of the text.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), InvalidUtf8> {
        // Finish the character left open by the previous piece, a byte at a time.
        while self.due > 0 {
            let Some((&byte, rest)) = bytes.split_first() else {
                return Ok(());
            };
            self.step(byte)?;
            bytes = rest;
        }
        // The rest starts on a character boundary: the standard library checks it fast, and
        // says whether it stopped at an invalid byte or at a character cut off by the end.
        match std::str::from_utf8(bytes) {
            Ok(_) => Ok(()),
            Err(err) if err.error_len().is_some() => Err(InvalidUtf8),
            Err(err) => {
                // A valid prefix of one character (at most 3 bytes): remember where it stands.
                for &byte in &bytes[err.valid_up_to()..] {
                    self.step(byte)?;
                }
                Ok(())
            }
        }
    }

    /// Whether the text so far ends on a character boundary (as a whole message must).
    pub fn is_complete(&self) -> bool {
        self.due == 0
    }

    /// Takes one byte (RFC 3629 §4, the table of well-formed sequences).
    fn step(&mut self, byte: u8) -> Result<(), InvalidUtf8> {
        if self.due > 0 {
            if !(self.low..=self.high).contains(&byte) {
                return Err(InvalidUtf8);
            }
            self.due -= 1;
            (self.low, self.high) = (0x80, 0xBF);
            return Ok(());
        }
        (self.due, self.low, self.high) = match byte {
            0x00..=0x7F => return Ok(()),
            0xC2..=0xDF => (1, 0x80, 0xBF),
            // No overlong three-byte form.
            0xE0 => (2, 0xA0, 0xBF),
            // No surrogate (U+D800 to U+DFFF).
            0xED => (2, 0x80, 0x9F),
            0xE1..=0xEC | 0xEE..=0xEF => (2, 0x80, 0xBF),
            // No overlong four-byte form.
            0xF0 => (3, 0x90, 0xBF),
            0xF1..=0xF3 => (3, 0x80, 0xBF),
            // Nothing past U+10FFFF.
            0xF4 => (3, 0x80, 0x8F),
            // Continuation bytes without a lead, overlong two-byte leads, 0xF5 and up.
            _ => return Err(InvalidUtf8),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The verdict on `bytes` fed whole, and fed a byte at a time (which must agree).
    fn check(bytes: &[u8]) -> Result<bool, InvalidUtf8> {
        let mut whole = Utf8Check::new();
        let whole = whole.feed(bytes).map(|()| whole.is_complete());
        let mut bytewise = Utf8Check::new();
        let bytewise = bytes
            .iter()
            .try_for_each(|b| bytewise.feed(std::slice::from_ref(b)))
            .map(|()| bytewise.is_complete());
        assert_eq!(
            whole, bytewise,
            "whole and byte by byte differ on {bytes:02x?}"
        );
        whole
    }

    #[test]
    fn accepts_valid_text_and_reports_a_character_cut_off() {
        for text in [
            "",
            "hello",
            "Hello-µ@ßöäüàá-UTF-8!!",
            "κόσμε",
            "\u{10FFFF}",
            "\u{FFFD}",
        ] {
            assert_eq!(check(text.as_bytes()), Ok(true), "{text:?}");
        }
        // Each proper prefix of a multi-byte character is valid so far, but not complete.
        for text in ["é", "€", "\u{10348}", "\u{10FFFF}"] {
            let bytes = text.as_bytes();
            for cut in 1..bytes.len() {
                assert_eq!(check(&bytes[..cut]), Ok(false), "{text:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn refuses_what_rfc_3629_forbids() {
        let invalid: [&[u8]; 12] = [
            b"\x80",             // a continuation byte without a lead
            b"\xC0\xAF",         // overlong '/'
            b"\xC1\xBF",         // overlong two-byte form
            b"\xE0\x80\xAF",     // overlong three-byte form
            b"\xED\xA0\x80",     // a surrogate
            b"\xF0\x80\x80\xAF", // overlong four-byte form
            b"\xF4\x90\x80\x80", // U+110000
            b"\xF5\x80\x80\x80", // a lead past U+10FFFF
            b"\xFE",             // never in UTF-8
            b"\xFF",             // never in UTF-8
            b"\xC3\x28",         // a lead followed by ASCII
            b"\xE2\x82\xAC\xAC", // a complete '€' then a stray continuation byte
        ];
        for bytes in invalid {
            assert_eq!(check(bytes), Err(InvalidUtf8), "{bytes:02x?}");
        }
    }

    #[test]
    fn fails_as_soon_as_the_text_cannot_be_valid() {
        // Autobahn 6.4.1's message: valid, then U+110000's first two bytes are already wrong.
        let mut check = Utf8Check::new();
        check
            .feed(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5")
            .expect("valid part");
        assert_eq!(check.feed(b"\xf4"), Ok(()), "0xF4 can still start U+10xxxx");
        assert_eq!(
            check.feed(b"\x90"),
            Err(InvalidUtf8),
            "0xF4 0x90 is past U+10FFFF"
        );
        // A surrogate is refused at its second byte.
        let mut check = Utf8Check::new();
        assert_eq!(check.feed(b"ok\xed"), Ok(()));
        assert_eq!(check.feed(b"\xa0"), Err(InvalidUtf8));
    }

    #[test]
    fn agrees_with_the_standard_library_on_every_split() {
        let samples: [&[u8]; 5] = [
            "aé€\u{10348}z".as_bytes(),
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
            b"\xf0\x90\x80",
            b"abc\xe2\x82",
            b"\xf4\x8f\xbf\xbf\xf4\x90",
        ];
        for bytes in samples {
            let expected = match std::str::from_utf8(bytes) {
                Ok(_) => Ok(true),
                Err(err) if err.error_len().is_none() => Ok(false),
                Err(_) => Err(InvalidUtf8),
            };
            for cut in 0..=bytes.len() {
                let mut check = Utf8Check::new();
                let got = check
                    .feed(&bytes[..cut])
                    .and_then(|()| check.feed(&bytes[cut..]))
                    .map(|()| check.is_complete());
                assert_eq!(got, expected, "{bytes:02x?} split at {cut}");
            }
        }
    }
}
