// Java's built-in HttpClient (java.net.http), default settings, as LangChain4j
// and Spring AI use it: over http:// it offers an h2c upgrade
// (Upgrade: h2c, Connection: Upgrade, HTTP2-Settings) with its first request.
//
// Run as a single-file program: java ChatClient.java BASE_URL KEY MODEL
// It sends one chat completion, then one streamed chat completion, and prints
// one line per event on stdout, flushed at once, so the caller can follow the
// stream as it arrives:
//   chat <status> <HTTP version> <body on one line>
//   stream <status> <HTTP version>
//   line <an SSE line>          (one per non-empty line, as it arrives)
//   end
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;

public class ChatClient {
    public static void main(String[] args) throws Exception {
        String base = args[0];
        String key = args[1];
        String model = args[2];
        HttpClient client = HttpClient.newHttpClient();

        HttpResponse<String> chat = client.send(
                post(base, key, "{\"model\": \"" + model + "\", \"messages\": []}"),
                HttpResponse.BodyHandlers.ofString());
        say("chat " + chat.statusCode() + " " + chat.version() + " "
                + chat.body().replace('\n', ' '));

        HttpResponse<java.util.stream.Stream<String>> stream = client.send(
                post(base, key, "{\"model\": \"" + model + "\", \"stream\": true, \"messages\": []}"),
                HttpResponse.BodyHandlers.ofLines());
        say("stream " + stream.statusCode() + " " + stream.version());
        stream.body().filter(line -> !line.isEmpty()).forEach(line -> say("line " + line));
        say("end");
    }

    static HttpRequest post(String base, String key, String json) {
        return HttpRequest.newBuilder(URI.create(base + "/v1/chat/completions"))
                .timeout(Duration.ofSeconds(30))
                .header("Authorization", "Bearer " + key)
                .header("Content-Type", "application/json")
                .POST(HttpRequest.BodyPublishers.ofString(json))
                .build();
    }

    static void say(String line) {
        System.out.println(line);
        System.out.flush();
    }
}
