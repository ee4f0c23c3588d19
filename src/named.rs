//! Enums whose values have fixed names: the values of flags, and the strings plans, configs and
//! checkpoints record. [`named!`] declares one and its names once; serde writes and reads it by
//! those names and the CLI lists and parses the same, so no library type depends on clap.

/// An enum whose every value has a name.
pub trait Named: Sized + Copy + Send + Sync + 'static {
    /// Every value, in the order help lists them.
    const ALL: &'static [Self];
    /// Their names, in the same order.
    const NAMES: &'static [&'static str];
    /// What each value does (its doc comment), in the same order; "" where it has none.
    const HELP: &'static [&'static str];

    fn name(self) -> &'static str;

    fn from_name(name: &str) -> Option<Self> {
        let at = Self::NAMES.iter().position(|&n| n == name)?;
        Self::ALL.get(at).copied()
    }
}

/// serde's reading of a [`Named`] value: its name, or serde's own "unknown variant" error.
pub fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Named,
{
    let name = <std::borrow::Cow<str> as serde::Deserialize>::deserialize(d)?;
    T::from_name(&name).ok_or_else(|| serde::de::Error::unknown_variant(&name, T::NAMES))
}

/// Declares an enum of named values: `enum E { /// doc ... A = "a", B = "b", }`. It derives
/// Debug, Clone, Copy, PartialEq and Eq, implements [`Named`], and is (de)serialized by name.
/// Attributes on the enum pass through (`#[derive(Default)]`); a variant takes its doc comment
/// and, written `[default] A = "a"`, the `#[default]` mark.
macro_rules! named {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $(
                $(#[doc = $doc:literal])*
                $([$default:ident])?
                $variant:ident = $text:literal,
            )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis enum $name {
            $(
                $(#[doc = $doc])*
                $(#[$default])?
                $variant,
            )+
        }

        impl $crate::named::Named for $name {
            const ALL: &'static [Self] = &[$($name::$variant),+];
            const NAMES: &'static [&'static str] = &[$($text),+];
            const HELP: &'static [&'static str] = &[$(concat!($($doc, " ",)* "")),+];

            fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str($crate::named::Named::name(*self))
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                $crate::named::deserialize(d)
            }
        }
    };
}

pub(crate) use named;

#[cfg(test)]
mod tests {
    use super::*;

    named! {
        /// A test enum.
        #[derive(Default)]
        enum Pick {
            /// The first
            /// of two.
            [default]
            First = "first",
            Second = "2nd",
        }
    }

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused_as_serde_does() {
        assert_eq!(Pick::default(), Pick::First);
        assert_eq!(Pick::NAMES, ["first", "2nd"]);
        assert_eq!(Pick::HELP[0].trim(), "The first  of two.");
        assert_eq!(Pick::HELP[1], "");
        assert_eq!(Pick::from_name("2nd"), Some(Pick::Second));
        assert_eq!(Pick::from_name("second"), None);
        assert_eq!(serde_json::to_string(&Pick::Second).unwrap(), "\"2nd\"");
        let back: Pick = serde_json::from_str("\"first\"").unwrap();
        assert_eq!(back, Pick::First);
        let e = serde_json::from_str::<Pick>("\"third\"").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown variant `third`, expected `first` or `2nd`"
        );
    }
}
