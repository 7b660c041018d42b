//! Small statistics for reports: mean, sample standard deviation, Welch's t-test with the
//! Welch–Satterthwaite degrees of freedom and a 95% interval for a difference of means. The
//! Student t distribution comes from `statrs`, a maintained and tested implementation, rather
//! than special functions written here.

use statrs::distribution::{ContinuousCDF, StudentsT};

/// Arithmetic mean; `None` for no values.
pub fn mean(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// Sample standard deviation (n − 1 in the denominator); `None` for fewer than two values.
pub fn sample_std(xs: &[f64]) -> Option<f64> {
    sample_var(xs).map(f64::sqrt)
}

/// Sample variance (n − 1 in the denominator); `None` for fewer than two values.
pub fn sample_var(xs: &[f64]) -> Option<f64> {
    if xs.len() < 2 {
        return None;
    }
    let m = mean(xs)?;
    Some(xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (xs.len() - 1) as f64)
}

/// Mean, sample standard deviation and count of a set of values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    pub std: Option<f64>,
}

pub fn summarize(xs: &[f64]) -> Option<Summary> {
    Some(Summary {
        n: xs.len(),
        mean: mean(xs)?,
        std: sample_std(xs),
    })
}

/// Welch's unequal-variance t-test of `b − a`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Welch {
    /// mean(b) − mean(a).
    pub diff: f64,
    /// Standard error of the difference.
    pub se: f64,
    pub t: f64,
    /// Welch–Satterthwaite degrees of freedom.
    pub df: f64,
    /// Two-sided p-value from the t distribution with `df` degrees of freedom.
    pub p: f64,
    /// 95% confidence interval of `diff`.
    pub ci_low: f64,
    pub ci_high: f64,
}

/// Welch's t-test of mean(b) − mean(a); `None` unless both sides have at least two values
/// and the difference has a nonzero standard error.
pub fn welch(a: &[f64], b: &[f64]) -> Option<Welch> {
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let (va, vb) = (sample_var(a)? / na, sample_var(b)? / nb);
    let diff = mean(b)? - mean(a)?;
    let se = (va + vb).sqrt();
    if se <= 0.0 || !se.is_finite() {
        return None;
    }
    let df = (va + vb).powi(2) / (va * va / (na - 1.0) + vb * vb / (nb - 1.0));
    let t = diff / se;
    let p = t_two_sided_p(t, df);
    let q = t_quantile_two_sided(0.05, df);
    Some(Welch {
        diff,
        se,
        t,
        df,
        p,
        ci_low: diff - q * se,
        ci_high: diff + q * se,
    })
}

/// Student's t with `df` degrees of freedom, centred at 0 with unit scale; `None` for a
/// df that is NaN or not positive.
fn students_t(df: f64) -> Option<StudentsT> {
    StudentsT::new(0.0, 1.0, df).ok()
}

/// P(|T| ≥ |t|) for Student's t with `df` degrees of freedom; NaN for a NaN `t` or an
/// invalid `df`.
pub fn t_two_sided_p(t: f64, df: f64) -> f64 {
    match students_t(df) {
        Some(d) if !t.is_nan() => (2.0 * d.sf(t.abs())).clamp(0.0, 1.0),
        _ => f64::NAN,
    }
}

/// The t such that P(|T| ≥ t) = `alpha` (e.g. 0.05 gives the 97.5% quantile); NaN for an
/// `alpha` outside (0, 1] or an invalid `df`. Taken from the lower tail, which keeps its
/// precision for small `alpha` where 1 − alpha/2 would round.
pub fn t_quantile_two_sided(alpha: f64, df: f64) -> f64 {
    match students_t(df) {
        Some(d) if alpha > 0.0 && alpha <= 1.0 => -d.inverse_cdf(alpha / 2.0),
        _ => f64::NAN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) {
        assert!(
            (a - b).abs() <= tol * b.abs().max(1e-300),
            "{a} vs {b} (relative tolerance {tol})"
        );
    }

    // Expected values below were computed once with scipy 1.17.1 (python3) and pasted here:
    //   scipy.stats.t.sf / t.ppf,
    //   scipy.stats.ttest_ind(b, a, equal_var=False).
    #[test]
    fn mean_and_sample_std_by_hand() {
        // 2, 4, 4, 4, 5, 5, 7, 9: mean 5, sum of squares 32, sample variance 32/7.
        let xs = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        assert_eq!(mean(&xs), Some(5.0));
        close(sample_std(&xs).unwrap(), (32.0f64 / 7.0).sqrt(), 1e-15);
        assert_eq!(sample_std(&[1.0]), None);
        assert_eq!(mean(&[]), None);
    }

    #[test]
    fn t_distribution_matches_scipy() {
        // 2 * scipy.stats.t.sf(2.0, 5) and 2 * t.sf(1.3, 2.7)
        close(t_two_sided_p(2.0, 5.0), 0.10193947882985835, 1e-10);
        close(t_two_sided_p(-1.3, 2.7), 0.29345264370384533, 1e-9);
        assert_eq!(t_two_sided_p(0.0, 5.0), 1.0);
        assert_eq!(t_two_sided_p(f64::INFINITY, 5.0), 0.0);
        assert!(t_two_sided_p(1.0, 0.0).is_nan());
        assert!(t_two_sided_p(f64::NAN, 5.0).is_nan());
        // scipy.stats.t.ppf(0.975, df) for df = 1, 4, 30
        close(t_quantile_two_sided(0.05, 1.0), 12.706204736174694, 1e-10);
        close(t_quantile_two_sided(0.05, 4.0), 2.7764451051977934, 1e-10);
        close(t_quantile_two_sided(0.05, 30.0), 2.0422724563012378, 1e-10);
        assert!(t_quantile_two_sided(0.0, 5.0).is_nan());
        assert!(t_quantile_two_sided(0.05, -1.0).is_nan());
    }

    #[test]
    fn t_quantiles_match_printed_tables() {
        // Two-sided critical values of the printed t tables (2.228, 4.303, 3.169, 63.657),
        // to more digits from mpmath 1.3 (betainc at 40 digits, solved for t).
        close(t_quantile_two_sided(0.05, 10.0), 2.2281388519862747, 1e-10);
        close(t_quantile_two_sided(0.05, 2.0), 4.302652729749464, 1e-10);
        close(t_quantile_two_sided(0.01, 10.0), 3.169272672616951, 1e-10);
        // df = 1 is the Cauchy distribution: tan(0.495 π).
        close(t_quantile_two_sided(0.01, 1.0), 63.65674116287158, 1e-10);
        // Round trip: the quantile's two-sided p is alpha again, for fractional df too.
        for df in [1.0, 1.92, 3.5, 12.0, 250.0] {
            for alpha in [0.2, 0.05, 0.001] {
                close(
                    t_two_sided_p(t_quantile_two_sided(alpha, df), df),
                    alpha,
                    1e-9,
                );
            }
        }
    }

    #[test]
    fn welch_matches_scipy() {
        let a = [1.50, 1.54, 1.47];
        let b = [1.20, 1.26];
        let w = welch(&a, &b).unwrap();
        // scipy.stats.ttest_ind(b, a, equal_var=False): statistic, pvalue, df
        close(w.diff, -0.2733333333333332, 1e-12);
        close(w.t, -7.548711866766242, 1e-9);
        close(w.df, 1.9217445310882622, 1e-9);
        close(w.p, 0.019092104643419483, 1e-8);
        // diff ± t.ppf(0.975, df) * se
        close(w.ci_low, -0.4353695570554712, 1e-8);
        close(w.ci_high, -0.11129710961119521, 1e-8);
        assert!(welch(&[1.0], &b).is_none());
        assert!(welch(&[1.0, 1.0], &[2.0, 2.0]).is_none());
    }
}
