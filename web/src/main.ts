// Entry point: signed in (a token kept from before) -> the app; otherwise the
// sign-in form. Signing out keeps the device id, so the device's delivered
// cursors survive for the next sign-in.

import { App } from "./app";
import { forgetToken, loadCredentials, saveCredentials, type Credentials } from "./session";
import { signIn } from "./view/signin";

const root = document.getElementById("app") ?? document.body;
let app: App | undefined;

function start(credentials: Credentials): void {
  saveCredentials(credentials);
  app = new App(root, credentials, signOut);
  app.start();
}

function signOut(notice: string): void {
  app?.stop();
  app = undefined;
  forgetToken();
  signIn(root, notice, start);
}

const saved = loadCredentials();
if (saved) start(saved);
else signIn(root, "", start);
