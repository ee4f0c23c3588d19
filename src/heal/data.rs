//! Training data: documents + EOS packed into windows of `seq_len + 1` tokens (inputs and their
//! next tokens), a held-out share kept for evaluation, and a shuffled order that is a pure function
//! of (seed, cursor), so a resumed run reads exactly what an uninterrupted one would.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::eval::data::{Window, Windows};
use crate::model::IGNORED;

/// Packed training windows and the held-out ones.
pub(crate) struct TrainData {
    train: Vec<Vec<u32>>,
    /// Whether each token of each training window carries the loss as a target (`heal --loss-on
    /// assistant`); None when every token does.
    trained: Option<Vec<Vec<bool>>>,
    pub held_out: Windows,
    seed: u64,
    /// The order of the epoch read last, kept to avoid reshuffling on every read.
    order: std::cell::RefCell<(u64, Vec<usize>)>,
}

impl TrainData {
    /// Cuts `stream` into windows of `seq_len + 1` tokens (the last partial one dropped); the last
    /// `holdout` share of them (at least one when `holdout > 0`) is held out, and scored on every
    /// token. `trained`, when given, marks the tokens of `stream` that carry the training loss.
    /// Returns None when there is not a single training window.
    pub fn new(
        stream: &[u32],
        trained: Option<&[bool]>,
        seq_len: usize,
        holdout: f64,
        seed: u64,
    ) -> Option<TrainData> {
        let mut windows: Vec<Vec<u32>> = stream
            .chunks_exact(seq_len + 1)
            .map(<[u32]>::to_vec)
            .collect();
        let held = if holdout > 0.0 {
            ((windows.len() as f64 * holdout).ceil() as usize).min(windows.len().saturating_sub(1))
        } else {
            0
        };
        let held_out = windows.split_off(windows.len() - held);
        if windows.is_empty() {
            return None;
        }
        let trained = trained.map(|t| {
            t.chunks_exact(seq_len + 1)
                .take(windows.len())
                .map(<[bool]>::to_vec)
                .collect()
        });
        let held_out = Windows {
            windows: held_out
                .into_iter()
                .map(|w| Window {
                    inputs: w[..seq_len].to_vec(),
                    targets: w[1..].to_vec(),
                })
                .collect(),
            seq_len,
        };
        Some(TrainData {
            train: windows,
            trained,
            held_out,
            seed,
            order: std::cell::RefCell::new((u64::MAX, vec![])),
        })
    }

    /// Keeps the first held-out windows that score at least `tokens` tokens (all of them if
    /// fewer): the rest stay out of training, but are not scored at every evaluation.
    pub(crate) fn limit_held_out(&mut self, tokens: usize) {
        let seq_len = self.held_out.seq_len.max(1);
        self.held_out
            .windows
            .truncate(tokens.div_ceil(seq_len).max(1));
    }

    /// Training windows (the tests' view of an epoch).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.train.len()
    }

    /// The window read at position `cursor` of the run (see [`TrainData::window`]), its next-token
    /// targets [`IGNORED`] where they carry no loss.
    pub fn inputs_targets(&self, cursor: u64) -> (&[u32], Vec<u32>) {
        let (w, index) = self.window_at(cursor);
        let mut targets = w[1..].to_vec();
        if let Some(trained) = &self.trained {
            for (t, &on) in targets.iter_mut().zip(&trained[index][1..]) {
                if !on {
                    *t = IGNORED;
                }
            }
        }
        (&w[..w.len() - 1], targets)
    }

    /// Training tokens that carry the loss as targets, and all of them, over every window.
    pub fn trained_targets(&self) -> (usize, usize) {
        let all = self.train.iter().map(|w| w.len() - 1).sum();
        let trained = self.trained.as_ref().map_or(all, |t| {
            t.iter()
                .map(|w| w[1..].iter().filter(|&&on| on).count())
                .sum()
        });
        (trained, all)
    }

    /// The window read at position `cursor` of the run: epoch `cursor / len` is a permutation of
    /// all windows drawn from (seed, epoch).
    #[cfg(test)]
    pub fn window(&self, cursor: u64) -> &[u32] {
        self.window_at(cursor).0
    }

    /// The window read at position `cursor`, and its index among the training windows.
    fn window_at(&self, cursor: u64) -> (&[u32], usize) {
        let n = self.train.len() as u64;
        let (epoch, index) = (cursor / n, (cursor % n) as usize);
        let mut cached = self.order.borrow_mut();
        if cached.0 != epoch {
            let mut order: Vec<usize> = (0..self.train.len()).collect();
            let mut rng =
                ChaCha8Rng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            order.shuffle(&mut rng);
            *cached = (epoch, order);
        }
        let at = cached.1[index];
        (&self.train[at], at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_holds_out_and_shuffles_reproducibly() {
        let stream: Vec<u32> = (0..50).collect();
        let d = TrainData::new(&stream, None, 4, 0.2, 7).unwrap();
        // 10 windows of 5 tokens: 2 held out, 8 to train on.
        assert_eq!((d.len(), d.held_out.windows.len()), (8, 2));
        let mut limited = TrainData::new(&stream, None, 4, 0.5, 0).unwrap();
        let held = limited.held_out.windows.len();
        limited.limit_held_out(5);
        assert_eq!(
            limited.held_out.windows.len(),
            2,
            "5 tokens need 2 windows of 4"
        );
        assert!(held > 2);
        assert_eq!(
            limited.len(),
            TrainData::new(&stream, None, 4, 0.5, 0).unwrap().len()
        );
        assert_eq!(d.held_out.windows[0].inputs, [40, 41, 42, 43]);
        assert_eq!(d.held_out.windows[0].targets, [41, 42, 43, 44]);
        let epoch: Vec<u32> = (0..8).map(|c| d.window(c)[0]).collect();
        let mut sorted = epoch.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 5, 10, 15, 20, 25, 30, 35]);
        assert_ne!(epoch, sorted, "shuffled");
        // The same cursor reads the same window; the next epoch is another order.
        assert_eq!(
            d.window(3),
            TrainData::new(&stream, None, 4, 0.2, 7).unwrap().window(3)
        );
        let next: Vec<u32> = (8..16).map(|c| d.window(c)[0]).collect();
        assert_ne!(epoch, next);
        assert!(TrainData::new(&stream[..4], None, 4, 0.0, 7).is_none());
    }
}
