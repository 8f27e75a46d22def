"""GitHub custom deployment protection rules: `deployment_protection_rule` webhooks in, the
review-custom-gates call out, authenticated as a GitHub App installation."""
