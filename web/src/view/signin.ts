// Sign-in: a user id exchanged for a token at /v1/dev-token on a development
// server; where that does not exist (404), a field to paste a token.

import { devToken } from "../api";
import { lastUserId, tokenSubject, type Credentials } from "../session";
import { h } from "./dom";

export function signIn(root: HTMLElement, notice: string, signedIn: (credentials: Credentials) => void): void {
  const user = h("input", {
    id: "signin-user",
    name: "user",
    autocomplete: "username",
    maxlength: 128,
    "data-testid": "signin-user",
  });
  user.value = lastUserId();
  const token = h("textarea", { id: "signin-token", rows: 3, spellcheck: "false", "data-testid": "signin-token" });
  const tokenField = h(
    "div",
    { class: "field", hidden: true },
    h("label", { for: "signin-token" }, "Access token"),
    h("p", { class: "hint", id: "signin-token-hint" }, "This server hands out no development tokens: paste a token (JWT) issued for you."),
    token,
  );
  token.setAttribute("aria-describedby", "signin-token-hint");
  const error = h("p", { class: "error", role: "alert", "data-testid": "signin-error" }, notice);
  const button = h("button", { type: "submit", "data-testid": "signin-button" }, "Sign in");

  const submit = async (event: SubmitEvent) => {
    event.preventDefault();
    error.textContent = "";
    const userId = user.value.trim();
    const pasted = token.value.trim();
    if (pasted) {
      signedIn({ userId: tokenSubject(pasted) || userId, token: pasted });
      return;
    }
    if (!userId) {
      error.textContent = "Enter your user id.";
      user.focus();
      return;
    }
    button.disabled = true;
    try {
      const issued = await devToken(userId);
      if (issued) {
        signedIn({ userId, token: issued });
        return;
      }
      tokenField.hidden = false;
      token.focus();
    } catch (failure) {
      error.textContent = failure instanceof Error ? failure.message : String(failure);
    } finally {
      button.disabled = false;
    }
  };

  root.replaceChildren(
    h(
      "main",
      { class: "signin" },
      h(
        "form",
        { onSubmit: submit, "aria-labelledby": "signin-title" },
        h("h1", { id: "signin-title" }, "Sign in to Messenger"),
        h("div", { class: "field" }, h("label", { for: "signin-user" }, "User id"), user),
        tokenField,
        error,
        button,
      ),
    ),
  );
  user.focus();
}
