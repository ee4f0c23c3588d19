//! Layer ranges (`a..b`, end excluded), (P,C,K) shapes, and the resolution of a request into the
//! three parts with the paper's default layer rule (DESIGN.md decision 2).

use std::fmt;
use std::str::FromStr;

use super::PlanError;

/// Source layers `start..end`, end excluded, written `a..b` everywhere (flags, plan files, output).
///
/// ```
/// use surgery::plan::LayerRange;
/// let core: LayerRange = "18..26".parse().unwrap();
/// assert_eq!((core.len(), core.to_string()), (8, "18..26".to_string()));
/// assert!("26..18".parse::<LayerRange>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LayerRange {
    pub start: usize,
    pub end: usize,
}

impl LayerRange {
    pub fn new(start: usize, end: usize) -> LayerRange {
        LayerRange { start, end }
    }

    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, layer: usize) -> bool {
        (self.start..self.end).contains(&layer)
    }

    pub fn iter(&self) -> std::ops::Range<usize> {
        self.start..self.end
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

impl FromStr for LayerRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid layer range {s:?}: expected a..b with a <= b (end excluded)");
        let (a, b) = s.split_once("..").ok_or_else(bad)?;
        let start: usize = a.trim().parse().map_err(|_| bad())?;
        let end: usize = b.trim().parse().map_err(|_| bad())?;
        if start > end {
            return Err(bad());
        }
        Ok(LayerRange { start, end })
    }
}

impl serde::Serialize for LayerRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for LayerRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Layer counts (P, C, K), written `P,C,K`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub prelude: usize,
    pub core: usize,
    pub coda: usize,
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{},{}", self.prelude, self.core, self.coda)
    }
}

impl FromStr for Shape {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("invalid shape {s:?}: expected P,C,K, three layer counts such as 4,8,4");
        let parts: Vec<usize> = s
            .split(',')
            .map(|p| p.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        match parts[..] {
            [prelude, core, coda] => Ok(Shape {
                prelude,
                core,
                coda,
            }),
            _ => Err(bad()),
        }
    }
}

/// The three parts, resolved against a model's layer count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layers {
    pub prelude: LayerRange,
    pub core: LayerRange,
    pub coda: LayerRange,
}

impl Layers {
    pub fn shape(&self) -> Shape {
        Shape {
            prelude: self.prelude.len(),
            core: self.core.len(),
            coda: self.coda.len(),
        }
    }

    /// Source layers in output order: prelude, core, coda.
    pub(crate) fn output_order(&self) -> impl Iterator<Item = usize> {
        self.prelude
            .iter()
            .chain(self.core.iter())
            .chain(self.coda.iter())
    }

    /// The parts that use `layer`, by name.
    pub(crate) fn roles_of(&self, layer: usize) -> Vec<&'static str> {
        self.named()
            .into_iter()
            .filter(|(_, r)| r.contains(layer))
            .map(|(n, _)| n)
            .collect()
    }

    pub fn named(&self) -> [(&'static str, LayerRange); 3] {
        [
            ("prelude", self.prelude),
            ("core", self.core),
            ("coda", self.coda),
        ]
    }

    /// Maximal runs of source layers no part uses.
    pub fn dropped(&self, n_layers: usize) -> Vec<LayerRange> {
        let mut out: Vec<LayerRange> = Vec::new();
        for l in (0..n_layers).filter(|&l| self.roles_of(l).is_empty()) {
            match out.last_mut() {
                Some(r) if r.end == l => r.end = l + 1,
                _ => out.push(LayerRange::new(l, l + 1)),
            }
        }
        out
    }
}

/// What the user asked for: a shape, explicit ranges, or both.
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerRequest {
    pub shape: Option<Shape>,
    pub prelude: Option<LayerRange>,
    pub core: Option<LayerRange>,
    pub coda: Option<LayerRange>,
    pub allow_reuse: bool,
}

impl LayerRequest {
    /// Whether any part is given as a range (then the request is one fixed layer map).
    pub fn has_ranges(&self) -> bool {
        self.prelude.is_some() || self.core.is_some() || self.coda.is_some()
    }

    /// Resolves the request for a model of `n_layers` and validates it: default rule for the
    /// parts not given, lengths agreeing with the shape, ranges in bounds, a non-empty core, and
    /// no layer in two parts unless `allow_reuse`.
    pub fn resolve(&self, n_layers: usize) -> Result<Layers, PlanError> {
        let given = [self.prelude, self.core, self.coda];
        let layers = match self.shape {
            None if given.iter().all(Option::is_some) => Layers {
                prelude: self.prelude.unwrap_or(LayerRange::new(0, 0)),
                core: self.core.unwrap_or(LayerRange::new(0, 0)),
                coda: self.coda.unwrap_or(LayerRange::new(0, 0)),
            },
            None => return Err(PlanError::NoShape),
            Some(shape) => default_rule(shape, n_layers, self)?,
        };
        for (name, range) in layers.named() {
            if range.end > n_layers {
                return Err(PlanError::OutOfBounds {
                    part: name,
                    range,
                    n_layers,
                });
            }
        }
        if layers.core.is_empty() {
            return Err(PlanError::EmptyCore);
        }
        if !self.allow_reuse {
            for layer in 0..n_layers {
                if let [a, b, ..] = layers.roles_of(layer)[..] {
                    let range = |p: &str| {
                        layers
                            .named()
                            .into_iter()
                            .find(|(n, _)| *n == p)
                            .map_or(LayerRange::new(0, 0), |(_, r)| r)
                    };
                    return Err(PlanError::Reused {
                        layer,
                        first: a,
                        first_range: range(a),
                        second: b,
                        second_range: range(b),
                    });
                }
            }
        }
        Ok(layers)
    }
}

/// The paper's rule: prelude = first P, coda = last K, core = the C layers just before the coda;
/// any part given explicitly replaces the rule's choice and must have the shape's length.
fn default_rule(shape: Shape, n_layers: usize, req: &LayerRequest) -> Result<Layers, PlanError> {
    let total = shape.prelude + shape.core + shape.coda;
    let explicit = [req.prelude, req.core, req.coda];
    if total > n_layers && explicit.iter().all(Option::is_none) && !req.allow_reuse {
        return Err(PlanError::ShapeTooDeep { shape, n_layers });
    }
    let coda_start = n_layers.saturating_sub(shape.coda);
    let rule = Layers {
        prelude: LayerRange::new(0, shape.prelude.min(n_layers)),
        core: LayerRange::new(coda_start.saturating_sub(shape.core), coda_start),
        coda: LayerRange::new(coda_start, n_layers),
    };
    let pick = |name: &'static str, given: Option<LayerRange>, rule: LayerRange, want: usize| {
        match given {
            Some(r) if r.len() != want => Err(PlanError::LengthMismatch {
                part: name,
                range: r,
                want,
                shape,
            }),
            Some(r) => Ok(r),
            None => Ok(rule),
        }
    };
    Ok(Layers {
        prelude: pick("prelude", req.prelude, rule.prelude, shape.prelude)?,
        core: pick("core", req.core, rule.core, shape.core)?,
        coda: pick("coda", req.coda, rule.coda, shape.coda)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(shape: &str) -> LayerRequest {
        LayerRequest {
            shape: Some(shape.parse().unwrap()),
            ..Default::default()
        }
    }

    #[test]
    fn default_rule_matches_the_paper() {
        // TinyLlama (4,8,4): prelude 0-3, core 10-17, coda 18-21 (REFERENCE.md).
        let l = req("4,8,4").resolve(22).unwrap();
        assert_eq!(
            (
                l.prelude.to_string(),
                l.core.to_string(),
                l.coda.to_string()
            ),
            ("0..4".into(), "10..18".into(), "18..22".into())
        );
        assert_eq!(l.dropped(22), vec![LayerRange::new(4, 10)]);
        // Llama-3.2-1B (2,4,2): prelude 0-1, core 10-13, coda 14-15.
        let l = req("2,4,2").resolve(16).unwrap();
        assert_eq!(
            (l.core, l.coda),
            (LayerRange::new(10, 14), LayerRange::new(14, 16))
        );
    }

    #[test]
    fn overrides_and_errors() {
        let mut r = req("4,8,4");
        r.core = Some("6..14".parse().unwrap());
        let l = r.resolve(22).unwrap();
        assert_eq!(
            l.dropped(22),
            vec![LayerRange::new(4, 6), LayerRange::new(14, 18)]
        );

        r.core = Some("6..13".parse().unwrap());
        let e = r.resolve(22).unwrap_err().to_string();
        assert_eq!(e, "--core 6..13 has 7 layers, but --shape 4,8,4 asks for 8");

        r.core = Some("2..10".parse().unwrap());
        let e = r.resolve(22).unwrap_err().to_string();
        assert_eq!(e, "layer 2 is used by both prelude (0..4) and core (2..10); pass --allow-reuse to loop a layer that also runs elsewhere");
        r.allow_reuse = true;
        assert!(r.resolve(22).is_ok());

        let e = req("4,0,4").resolve(22).unwrap_err().to_string();
        assert_eq!(e, "the core is empty: it needs at least one layer");
        let e = req("10,10,10").resolve(22).unwrap_err().to_string();
        assert_eq!(e, "--shape 10,10,10 needs 30 layers, but the model has 22");

        let mut r = req("4,8,4");
        r.coda = Some("20..24".parse().unwrap());
        let e = r.resolve(22).unwrap_err().to_string();
        assert_eq!(
            e,
            "--coda 20..24 is out of bounds: the model has 22 layers (0..22)"
        );

        let e = LayerRequest::default().resolve(22).unwrap_err().to_string();
        assert!(e.contains("--shape P,C,K"), "{e}");
    }

    #[test]
    fn parsing() {
        assert_eq!("4, 8,4".parse::<Shape>().unwrap().to_string(), "4,8,4");
        for bad in ["4,8", "4,8,4,4", "a,b,c", "", "4,-1,4"] {
            assert!(bad.parse::<Shape>().unwrap_err().contains("expected P,C,K"));
        }
        for bad in ["3", "5..2", "1...3", "x..4"] {
            assert!(bad
                .parse::<LayerRange>()
                .unwrap_err()
                .contains("expected a..b"));
        }
    }
}
