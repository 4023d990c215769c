package dev.monsoon.opensearch;

import java.io.IOException;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.StandardCopyOption;
import java.util.Collection;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import org.opensearch.Version;
import org.opensearch.analysis.common.CommonAnalysisPlugin;
import org.opensearch.common.logging.LogConfigurator;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.http.HttpServerTransport;
import org.opensearch.index.reindex.ReindexPlugin;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.painless.PainlessPlugin;
import org.opensearch.plugins.Plugin;
import org.opensearch.transport.Netty4Plugin;

/**
 * A single OpenSearch node for monsoon's tests, run in this JVM from the server and module jars
 * on the classpath: no distribution tarball, no launcher scripts.
 *
 * <p>Usage: {@code java -cp '<dir>/*' dev.monsoon.opensearch.TestNode --home DIR --http-port P
 * [-Ekey=value ...]}. Binds to loopback only, forms a cluster of one (single-node discovery),
 * keeps its data under {@code DIR/data} (a restart on the same {@code DIR} keeps the indices), logs
 * to stdout, prints {@value #READY} followed by the HTTP address once the cluster state is
 * recovered, and stops cleanly on SIGTERM.
 *
 * <p>The launcher's bootstrap checks (including its refusal to run as root, the heap and
 * {@code vm.max_map_count} checks) live in OpenSearch's {@code Bootstrap}, which this does not
 * use; {@link Node} itself checks none of them.
 */
public final class TestNode {
    /** Start of the line printed once the node serves HTTP requests. */
    static final String READY = "monsoon-opensearch ready ";

    /** The modules a distribution loads from {@code modules/}, as classpath plugins here. */
    static final List<Class<? extends Plugin>> MODULES = List.of(
        Netty4Plugin.class,          // HTTP and transport
        CommonAnalysisPlugin.class,  // the usual analyzers, tokenizers and filters
        ReindexPlugin.class,         // _reindex, _update_by_query, _delete_by_query
        PainlessPlugin.class         // scripts (scripted updates, script queries)
    );

    /** {@link Node} with classpath plugins; that constructor is protected. */
    static final class ClasspathNode extends Node {
        ClasspathNode(Environment environment, Collection<Class<? extends Plugin>> plugins) {
            super(environment, plugins, true);
        }
    }

    private TestNode() {}

    public static void main(String[] args) throws Exception {
        // We stop log4j ourselves once the node is closed, so the close still gets logged.
        System.setProperty("log4j.shutdownHookEnabled", "false");
        System.setProperty("log4j2.disable.jmx", "true");

        Path home = null;
        String httpPort = null;
        Settings.Builder extra = Settings.builder();
        for (int i = 0; i < args.length; i++) {
            String a = args[i];
            if (a.equals("--home") && i + 1 < args.length) {
                home = Paths.get(args[++i]).toAbsolutePath();
            } else if (a.equals("--http-port") && i + 1 < args.length) {
                httpPort = args[++i];
            } else if (a.startsWith("-E") && a.indexOf('=') > 2) {
                int eq = a.indexOf('=');
                extra.put(a.substring(2, eq), a.substring(eq + 1));
            } else {
                System.err.println("usage: TestNode --home DIR --http-port PORT [-Ekey=value ...]; unexpected: " + a);
                System.exit(2);
            }
        }
        if (home == null || httpPort == null) {
            System.err.println("usage: TestNode --home DIR --http-port PORT [-Ekey=value ...]");
            System.exit(2);
        }

        Files.createDirectories(home.resolve("config"));
        Files.createDirectories(home.resolve("plugins"));
        Files.createDirectories(home.resolve("modules"));
        try (InputStream in = TestNode.class.getResourceAsStream("/log4j2.properties")) {
            Files.copy(in, home.resolve("config").resolve("log4j2.properties"), StandardCopyOption.REPLACE_EXISTING);
        }

        Settings settings = Settings.builder()
            .put("cluster.name", "monsoon-test")
            .put("node.name", "monsoon-test-node")
            .put("path.home", home.toString())
            .put("path.data", home.resolve("data").toString())
            .put("path.logs", home.resolve("logs").toString())
            // Loopback only; a cluster of one that elects itself at once.
            .put("network.host", "127.0.0.1")
            .put("discovery.type", "single-node")
            .put("http.port", httpPort)
            // Any free transport port: nothing connects to it but the node itself.
            .put("transport.port", "0")
            // Test machines' disks are often more than 85-95% full: never refuse shards or
            // make indices read-only for that.
            .put("cluster.routing.allocation.disk.threshold_enabled", false)
            // With a small heap the real-memory parent breaker trips on GC timing, not on
            // load (429s the tests did not ask for); the per-request breakers stay on.
            .put("indices.breaker.total.use_real_memory", false)
            .put(extra.build())
            .build();

        Environment env = InternalSettingsPreparer.prepareEnvironment(settings, Collections.emptyMap(), null, () -> "monsoon-test-node");
        LogConfigurator.registerErrorListener();
        LogConfigurator.setNodeName("monsoon-test-node");
        LogConfigurator.configure(env);

        Node node = new ClasspathNode(env, MODULES);
        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                node.close();
                if (!node.awaitClose(20, TimeUnit.SECONDS)) {
                    System.err.println("monsoon-opensearch: node did not close within 20 s");
                }
            } catch (IOException | InterruptedException e) {
                e.printStackTrace();
            } finally {
                System.out.println("monsoon-opensearch stopped");
                System.out.flush();
                org.apache.logging.log4j.LogManager.shutdown();
                stopped.countDown();
            }
        }, "monsoon-opensearch-shutdown"));

        try {
            node.start();
            // Ready means requests are served: the single node elected itself and the cluster
            // state (and with it the indices of a restarted node) is recovered.
            node.client().admin().cluster().prepareHealth()
                .setWaitForYellowStatus()
                .setTimeout(org.opensearch.common.unit.TimeValue.timeValueSeconds(60))
                .get();
        } catch (Throwable t) {
            t.printStackTrace();
            System.out.flush();
            Runtime.getRuntime().halt(1);
        }
        HttpServerTransport http = node.injector().getInstance(HttpServerTransport.class);
        System.out.println(READY + "http://" + http.boundAddress().publishAddress() + " opensearch " + Version.CURRENT);
        System.out.flush();

        // The node's threads are daemons: this one keeps the JVM up until the shutdown hook ran.
        stopped.await();
    }
}
